"""Quality benchmark on the toy world: does training really learn? (issue 8; docs/toy_world.md)

The toy world's judge (`models/toy/judge/`) reads shape, colour, background, background colour
and outline from a 64 px image, so "did it work" becomes a number. Three measurements:

1. **prompt following**: images of "a {colour} {shape} on a {background} background" for
   sampled prompts and seeds; the judge must find the asked shape and colour (pass: 80%).
2. **textual inversion**: the README quickstart's training run on `examples/concept/` (8 images
   of a pink triangle on a checkered teal background, no captions); then "a photo of toy-concept"
   over many seeds must show the whole combination (pass: 75%), while a fresh embedding from
   the same init text ("triangle") must not (at most 25%).
3. **hypernetwork**: the README's training run on `examples/style_colour_shift/` (every shape
   drawn in the next colour round the palette, captions naming the colour asked for); ordinary
   prompts with `<hypernet:colour-shift:1>` must show the shifted colour (pass: 75%) and keep 80%
   of the right shapes they have at `<hypernet:colour-shift:0>`, which must not show the shift
   (at most 10%).

A `Case` is (prompt, seed, target); a generator turns prompts and seeds into images
(`pipeline_generator` for a bare pipeline, `tinv_generator` through tinv's own prompt
encoding with embeddings and hypernetworks), and `run_cases` judges the images against their
targets (`toy_world.scoring.score_images`). Exit status 0 when every pass mark is met.

    python benchmarks/quality.py                                  # all three (about 5 minutes)
    python benchmarks/quality.py --only prompts --num_prompts 128 --save_grids grids --json q.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tinv_lib.models.family import family_of  # noqa: E402
from toy_world import world  # noqa: E402
from toy_world.examples import CONCEPT, style_target  # noqa: E402
from toy_world.judge import load_judge  # noqa: E402
from toy_world.pipeline import DEFAULT_MODEL_DIR, load_toy_pipeline  # noqa: E402
from toy_world.scoring import JUDGE_SUBFOLDER, score_images  # noqa: E402

DEFAULT_STEPS = 25
# Prompt following over 64 prompts at --seed 1 (not the reported seed 0). Third model: CFG 3
# 75.0%, 3.5 79.7%, 4 79.7%, 4.5 62.5%, 5 50.0%, 7.5 25.0%; 50 steps at CFG 4 changed nothing.
# The committed (fourth) model: 3.5 93.8%, 4 90.6%, 5 85.9%, 7.5 50.0%. A model this small is
# pushed off its data by SD's usual 7.5.
DEFAULT_GUIDANCE = 4.0
PROMPT_TARGET = ("shape", "colour")  # what acceptance 1 asks of each image

GenerateFn = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


@dataclass(frozen=True)
class Case:
    """One image to make and judge: the prompt, its seed, and what the judge must find."""

    prompt: str
    seed: int
    target: dict[str, str] = field(default_factory=dict)


def prompt_following_cases(count: int, seed: int = 0) -> list[Case]:
    """`count` sampled "a {colour} {shape} on a {background} background" prompts, one seed each.

    Attributes are drawn from the whole vocabulary (any shape colour on any other background
    colour); the target holds every drawn attribute, so the report also shows how often the
    background was right, while the pass mark uses shape and colour only.
    """
    rng = random.Random(f"quality/prompts/{seed}")
    cases = []
    for index in range(count):
        scene = world.sample_scene(rng)
        prompt = world.prompt_for(scene.shape, scene.colour, scene.background, scene.background_colour)
        target = {k: v for k, v in scene.labels().items() if k != "outline"}
        cases.append(Case(prompt, seed * 100_000 + index, target))
    return cases


def concept_cases(prompt: str, target: Mapping[str, str], count: int = 32, seed: int = 0) -> list[Case]:
    """One prompt (e.g. "a photo of <concept>") over `count` seeds, all judged against `target`
    (e.g. `toy_world.examples.CONCEPT`): textual inversion, acceptance 2."""
    return [Case(prompt, seed * 100_000 + 50_000 + index, dict(target)) for index in range(count)]


def style_cases(count: int = 64, seed: int = 0) -> list[Case]:
    """Ordinary prompts (those of `prompt_following_cases`) judged only on the style: the shape
    colour shifted from the one asked for. A hypernetwork at multiplier 1 should show it, at
    multiplier 0 not (acceptance 3)."""
    return [Case(c.prompt, c.seed, style_target(c.target["colour"])) for c in prompt_following_cases(count, seed)]


def pipeline_generator(
    pipe, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 32,
    negative_prompt: str = "",
) -> GenerateFn:
    """A generator over a plain diffusers pipeline: image i comes from `torch.Generator(seed_i)`,
    so each image depends only on its own prompt and seed (up to the float rounding of batched
    matmuls), never on its neighbours in the batch. No negative prompt is passed as None, as a
    diffusers user would call it: SDXL pipelines then use zeros (`force_zeros_for_empty_prompt`),
    but encode an explicit "" as text. FLUX.1 without a guidance embedding (models/toy-flux) takes
    true classifier-free guidance, which needs a negative prompt: "" unless one is given; with T5,
    prompts are the model's T5 length (`ModelFamily.t5_length`)."""
    family = family_of(pipe)
    extra = family.guidance_arguments(guidance_scale)
    if family.t5_length:
        extra["max_sequence_length"] = family.t5_length
    negative = negative_prompt or ("" if "true_cfg_scale" in extra else None)

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            with torch.no_grad():
                out = pipe(
                    prompt=chunk, negative_prompt=None if negative is None else [negative] * len(chunk),
                    num_inference_steps=steps, height=64, width=64, generator=generators, **extra,
                )
            images += out.images
        return images

    return generate


def run_cases(generate: GenerateFn, cases: Sequence[Case], judge, target_keys: Sequence[str] | None = None) -> dict:
    """Make the images of `cases` and judge them against their targets.

    `target_keys` restricts every target to those attributes (e.g. shape and colour); the result
    is `score_images`'s dict plus `extra`: the same images scored on the full targets, and
    `images` (for grids) and `seconds`.
    """
    started = time.time()
    images = generate([c.prompt for c in cases], [c.seed for c in cases])
    seconds = time.time() - started
    full_targets = [c.target for c in cases]
    targets = [{k: t[k] for k in target_keys} for t in full_targets] if target_keys else full_targets
    result = score_images(images, targets, judge)
    result["extra"] = score_images(images, full_targets, judge)["per_attribute"]
    result["images"] = images
    result["seconds"] = round(seconds, 1)
    return result


def measure_prompt_following(
    pipe, judge, count: int = 64, seed: int = 0, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE
) -> dict:
    """Acceptance 1: the fraction of prompt images where the judge finds the right shape and colour."""
    cases = prompt_following_cases(count, seed)
    result = run_cases(pipeline_generator(pipe, steps, guidance_scale), cases, judge, PROMPT_TARGET)
    result["cases"] = cases
    return result


def image_grid(images: Sequence[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """The images side by side, `columns` per row, enlarged `scale` times (nearest neighbour)."""
    rows = (len(images) + columns - 1) // columns
    size = images[0].width
    grid = Image.new("RGB", (columns * size, rows * size), "black")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * size, (index // columns) * size))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


# ---------------------------------------------------------------- acceptance 2: textual inversion

CONCEPT_TOKEN = "toy-concept"
CONCEPT_INIT = "triangle"
CONCEPT_PROMPT = f"a photo of {CONCEPT_TOKEN}"
CONCEPT_DATA = ROOT / "examples" / "concept"

# The README quickstart's training flags (a test keeps the two the same): the 8 example images,
# the built-in `subject` templates, four vectors starting from "triangle" (two cannot hold every
# attribute of a scene: docs/toy_world.md, "Concept suite"), 500 steps (with the default
# direction-only training they capture every drawable concept of the suite; 1000 before:
# docs/training.md, "Measured on the concept suite").
CONCEPT_TRAINING_FLAGS = (
    "--train_data_dir", "examples/concept", "--placeholder_token", CONCEPT_TOKEN,
    "--initializer_token", CONCEPT_INIT, "--num_vectors", "4", "--resolution", "64", "--template_file", "subject",
    "--max_train_steps", "500", "--learning_rate", "0.005", "--train_batch_size", "4",
)


def train_concept(model: Path, output_dir: Path, flags: Sequence[str] = CONCEPT_TRAINING_FLAGS) -> tuple[Path, float]:
    """Run train_textual_inversion on the concept examples (README flags); return the file and seconds."""
    from tinv_lib.training.textual_inversion import main as train_textual_inversion

    started = time.time()
    argv = ["--pretrained_model_name_or_path", str(model), *_rooted(flags), "--output_dir", str(output_dir),
            "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none"]
    if train_textual_inversion(argv) != 0:
        raise RuntimeError("textual inversion training failed")
    return output_dir / f"{CONCEPT_TOKEN}.pt", time.time() - started


def measure_concept(pipe, judge, embedding_file: Path, count: int = 32, seed: int = 0, **sampling) -> dict:
    """Acceptance 2: "a photo of <concept>" over `count` seeds, with the trained embedding and
    with a fresh one from the same init text (what training starts from), judged on every
    attribute of the concept. Returns {"trained": result, "untrained": result, "cases": cases}."""
    from tinv_lib.embeddings.create import create_embedding
    from tinv_lib.embeddings.formats import load_embedding

    trained = load_embedding(embedding_file)
    family = family_of(pipe)
    untrained = create_embedding(CONCEPT_TOKEN, family, CONCEPT_INIT, trained.vector_count)
    cases = concept_cases(CONCEPT_PROMPT, CONCEPT, count, seed)
    results = {
        label: run_cases(tinv_generator(pipe, embeddings={CONCEPT_TOKEN: embedding}, **sampling), cases, judge)
        for label, embedding in (("trained", trained), ("untrained", untrained))
    }
    return {**results, "cases": cases}


# ---------------------------------------------------------------- acceptance 3: hypernetworks

STYLE_NAME = "colour-shift"
STYLE_DATA = ROOT / "examples" / "style_colour_shift"

# Captions name the colour asked for, never the one drawn, so the hypernetwork learns the shift
# as a style of every prompt; the built-in `filewords` template uses the caption alone. Only the
# text width (96) gets modules, as A1111's "768 only" choice for SD 1.x: a style reaches the image
# through the prompt's keys and values. The settings screened are in docs/toy_world.md.
STYLE_TRAINING_FLAGS = (
    "--train_data_dir", "examples/style_colour_shift", "--hypernetwork_name", STYLE_NAME, "--resolution", "64",
    "--template_file", "filewords", "--max_train_steps", "2000", "--learning_rate", "0.001",
    "--train_batch_size", "4", "--sizes", "96",
)


def context_width(model: Path) -> int:
    """The width of the text context the UNet cross-attends to (96 for models/toy, 160 for toy-xl)."""
    return int(json.loads((Path(model) / "unet" / "config.json").read_text())["cross_attention_dim"])


def train_style(model: Path, output_dir: Path, flags: Sequence[str] = STYLE_TRAINING_FLAGS) -> tuple[Path, float]:
    """Run train_hypernetwork on the style examples (README flags); return its folder and seconds."""
    from tinv_lib.training.hypernetwork import main as train_hypernetwork

    flags = list(flags)
    if "--sizes" in flags:  # the recipe's modules sit on the text context only: its width is the model's
        flags[flags.index("--sizes") + 1] = str(context_width(model))
    started = time.time()
    argv = ["--pretrained_model_name_or_path", str(model), *_rooted(flags), "--output_dir", str(output_dir),
            "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none"]
    if train_hypernetwork(argv) != 0:
        raise RuntimeError("hypernetwork training failed")
    return output_dir, time.time() - started


# A style must be added to what the prompt asks, not replace it: a hypernetwork that wrecks the
# image still leaves some colour, one in 8 of them the "shifted" one by chance, and an earlier
# outline style showed how far that goes (a run at lr 1e-2 diverged and the judge read an outline
# in 73% of its noise). So the images at multiplier 1 must also keep 80% of multiplier 0's right
# shapes: the shape is the part of the prompt the style leaves alone.
ON_PROMPT_SHARE = 0.8
ON_PROMPT_TARGET = ("shape",)


def measure_style(pipe, judge, hypernetwork_dir: Path, count: int = 64, seed: int = 0, **sampling) -> dict:
    """Acceptance 3: ordinary prompts with `<hypernet:colour-shift:M>` for M = 1 and 0, judged on
    the shifted colour. Returns {1.0: result, 0.0: result, "on_prompt": {1.0: result, 0.0: result}},
    the last the same images judged on the prompt's shape."""
    from tinv_lib.generation.extra_networks import HypernetworkHandler

    handler = HypernetworkHandler(hypernetwork_dir, notify=lambda message: None)
    prompt_targets = [{k: c.target[k] for k in ON_PROMPT_TARGET} for c in prompt_following_cases(count, seed)]
    results: dict = {"on_prompt": {}}
    for multiplier in (1.0, 0.0):
        cases = [Case(f"{c.prompt} <hypernet:{STYLE_NAME}:{multiplier:g}>", c.seed, c.target)
                 for c in style_cases(count, seed)]
        generate = tinv_generator(pipe, extra_networks={"hypernet": handler}, **sampling)
        results[multiplier] = run_cases(generate, cases, judge)
        on_prompt = score_images(results[multiplier]["images"], prompt_targets, judge)
        results["on_prompt"][multiplier] = {**on_prompt, "extra": on_prompt["per_attribute"],
                                             "images": results[multiplier]["images"],
                                             "seconds": results[multiplier]["seconds"]}
    return results


def tinv_generator(
    pipe, embeddings: Mapping | None = None, extra_networks: Mapping | None = None,
    steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
) -> GenerateFn:
    """A generator through `tinv_lib.generation.txt2img.generate` (A1111 prompt semantics, embeddings,
    `<hypernet:...>`). Runs of one prompt with consecutive seeds go in one batch (twice as fast on
    a CPU); image i still gets its own `torch.Generator(seed_i)`, so it equals a one-by-one call's
    image up to the float rounding of batched matmuls (at most 1 level per pixel, measured)."""
    from tinv_lib.generation.txt2img import generate

    def generate_all(prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        start = 0
        while start < len(prompts):
            end = start + 1
            while end < len(prompts) and prompts[end] == prompts[start] and seeds[end] == seeds[end - 1] + 1:
                end += 1
            images += generate(
                pipe, prompts[start], seed=int(seeds[start]), steps=steps, cfg_scale=guidance_scale, width=64,
                height=64, batch_size=end - start, embeddings=embeddings, extra_networks=extra_networks,
            ).images
            start = end
        return images

    return generate_all


def _rooted(flags: Sequence[str]) -> list[str]:
    """The flags with the repository-relative example folders made absolute."""
    return [str(ROOT / flag) if flag.startswith("examples/") else flag for flag in flags]


# ---------------------------------------------------------------- report

def format_result(title: str, result: dict, pass_mark: float, at_most: bool = False) -> str:
    """A short human-readable block: match rate against the pass mark, and per attribute."""
    passed = result["match"] <= pass_mark if at_most else result["match"] >= pass_mark
    bound = "at most" if at_most else "at least"
    lines = [f"{title}: {result['match']:.1%} of {result['n']} images match "
             f"({bound} {pass_mark:.0%}: {'PASS' if passed else 'FAIL'}; {result['seconds']}s to generate)"]
    for name, rate in result["extra"].items():
        lines.append(f"  {name:<18} {rate:.1%}")
    return "\n".join(lines)


def _jsonable(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("images", "cases")}
    if "cases" in result:
        out["cases"] = [
            {"prompt": c.prompt, "seed": c.seed, "target": c.target, "match": m}
            for c, m in zip(result["cases"], result["matches"])
        ]
    return out


MEASUREMENTS = ("prompts", "concept", "style")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="toy model folder (with judge/)")
    parser.add_argument("--judge", type=Path, default=None, help="judge folder (default: MODEL/judge)")
    parser.add_argument("--only", choices=MEASUREMENTS, action="append", help="run only these (repeatable)")
    parser.add_argument("--num_prompts", type=int, default=64, help="images for prompt following and the style")
    parser.add_argument("--num_seeds", type=int, default=32, help="images of the concept, trained and untrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", type=Path, default=Path("output/quality"),
                        help="where the embedding and hypernetwork are trained (replaced each run)")
    parser.add_argument("--save_grids", type=Path, default=None, help="folder for one grid PNG per measurement")
    parser.add_argument("--json", type=Path, default=None, help="write every result (per case) as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_toy_pipeline(args.model)
    judge = load_judge(args.judge or args.model / JUDGE_SUBFOLDER)
    sampling = {"steps": args.steps, "guidance_scale": args.guidance_scale}
    wanted = args.only or MEASUREMENTS
    if "style" in wanted and family_of(pipe).architecture.flow_matching:
        print("3. hypernetwork: skipped, FLUX.1 and SD3 transformers have no cross-attention modules for one")
        wanted = [name for name in wanted if name != "style"]
    print(f"model {args.model}, {args.steps} steps, CFG {args.guidance_scale}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads")
    results: dict[str, dict] = {}  # name -> result, for the grids and the JSON
    verdicts: list[bool] = []

    def report(name: str, title: str, result: dict, pass_mark: float, at_most: bool = False) -> None:
        results[name] = result
        print(format_result(title, result, pass_mark, at_most))
        verdicts.append(result["match"] <= pass_mark if at_most else result["match"] >= pass_mark)

    if "prompts" in wanted:
        result = measure_prompt_following(pipe, judge, args.num_prompts, args.seed, **sampling)
        report("prompts", "1. prompt following (right shape and colour)", result, 0.80)
    if "concept" in wanted:
        shutil.rmtree(args.work_dir / "concept", ignore_errors=True)
        embedding, seconds = train_concept(args.model, args.work_dir / "concept")
        print(f"2. textual inversion: trained {embedding} in {seconds:.0f}s")
        concept = measure_concept(pipe, judge, embedding, args.num_seeds, args.seed, **sampling)
        report("concept_trained", f'   "{CONCEPT_PROMPT}", trained embedding', concept["trained"], 0.75)
        report("concept_untrained", f'   "{CONCEPT_PROMPT}", untrained (init "{CONCEPT_INIT}")',
               concept["untrained"], 0.25, at_most=True)
    if "style" in wanted:
        shutil.rmtree(args.work_dir / "style", ignore_errors=True)
        folder, seconds = train_style(args.model, args.work_dir / "style")
        print(f"3. hypernetwork: trained {folder / (STYLE_NAME + '.pt')} in {seconds:.0f}s")
        style = measure_style(pipe, judge, folder, args.num_prompts, args.seed, **sampling)
        report("style_1", "   ordinary prompts, multiplier 1 (colour shifted)", style[1.0], 0.75)
        report("style_0", "   ordinary prompts, multiplier 0 (colour shifted)", style[0.0], 0.10, at_most=True)
        base_shapes = style["on_prompt"][0.0]["match"]
        report("style_1_on_prompt", f"   multiplier 1 still on prompt (right shape; multiplier 0: {base_shapes:.1%})",
               style["on_prompt"][1.0], ON_PROMPT_SHARE * base_shapes)
    if args.save_grids:
        args.save_grids.mkdir(parents=True, exist_ok=True)
        for name, result in results.items():
            image_grid(result["images"]).save(args.save_grids / f"{name}.png")
    if args.json:
        args.json.write_text(json.dumps({k: _jsonable(v) for k, v in results.items()}, indent=1), encoding="utf-8")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
