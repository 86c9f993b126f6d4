"""Quality benchmark on the toy world: does the model draw what it is asked for? (issue 8)

The toy world's judge (`models/toy/judge/`) reads shape, colour, background, background colour
and outline from a 64 px image, so "did it work" becomes a number:

* **prompt following** (acceptance 1): images of "a {colour} {shape} on a {background}
  background" for sampled prompts and seeds; the judge must find the asked shape and colour.

The building blocks are generic so textual-inversion and hypernetwork measurements (issue 8
part B) are a few lines: a `Case` is (prompt, seed, target), a generator turns prompts and seeds
into images (`pipeline_generator` for a bare pipeline; any callable with the same signature for
pipelines with embeddings or hypernetworks loaded), and `run_cases` judges the images against
their targets (`tinv_lib.toy_world.scoring.score_images`).

    python benchmarks/quality.py                      # the committed model, 64 prompts
    python benchmarks/quality.py --num_prompts 128 --save_grid base.png --json base.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tinv_lib.toy_world import world  # noqa: E402
from tinv_lib.toy_world.judge import load_judge  # noqa: E402
from tinv_lib.toy_world.pipeline import DEFAULT_MODEL_DIR, load_toy_pipeline  # noqa: E402
from tinv_lib.toy_world.scoring import JUDGE_SUBFOLDER, score_images  # noqa: E402

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
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


def pipeline_generator(
    pipe, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 32,
    negative_prompt: str = "",
) -> GenerateFn:
    """A generator over a plain diffusers pipeline: image i comes from `torch.Generator(seed_i)`,
    so each image depends only on its own prompt and seed, never on its batch."""

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            with torch.no_grad():
                out = pipe(
                    prompt=chunk, negative_prompt=[negative_prompt] * len(chunk), num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=64, width=64, generator=generators,
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


def format_result(title: str, result: dict, pass_mark: float) -> str:
    """A short human-readable block: match rate against the pass mark, and per attribute."""
    verdict = "PASS" if result["match"] >= pass_mark else "FAIL"
    lines = [f"{title}: {result['match']:.1%} of {result['n']} images match "
             f"(pass mark {pass_mark:.0%}: {verdict}; {result['seconds']}s to generate)"]
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="toy model folder (with judge/)")
    parser.add_argument("--judge", type=Path, default=None, help="judge folder (default: MODEL/judge)")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save_grid", type=Path, default=None, help="write the generated images as a grid PNG")
    parser.add_argument("--json", type=Path, default=None, help="write the full result (per case) as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_toy_pipeline(args.model)
    judge = load_judge(args.judge or args.model / JUDGE_SUBFOLDER)
    result = measure_prompt_following(pipe, judge, args.num_prompts, args.seed, args.steps, args.guidance_scale)
    print(f"model {args.model}, {args.steps} steps, CFG {args.guidance_scale}, seed {args.seed}")
    print(format_result("1. prompt following (right shape and colour)", result, 0.80))
    if args.save_grid:
        image_grid(result["images"]).save(args.save_grid)
    if args.json:
        args.json.write_text(json.dumps(_jsonable(result), indent=1), encoding="utf-8")
    return 0 if result["match"] >= 0.80 else 1


if __name__ == "__main__":
    sys.exit(main())
