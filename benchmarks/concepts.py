"""Concept suite on the toy world: does training capture *any* concept, and can prompts still edit it?

`quality.py` measures one concept, the one the README recipe was tuned on. This suite trains an
embedding, with the README quickstart's flags, on each of 16 concepts the recipe has never seen
and asks the two questions users ask of every trainer:

* **reconstruction** ("it trains but does nothing"): "a photo of <name>" over 32 seeds must show
  the whole concept (scene concepts: shape, colour, background pattern and colour; object
  concepts: shape and colour);
* **editability** ("the embedding overrides my prompt"): "a photo of <name> on a <background>
  background" must show the concept *and* the asked background (object concepts: four other
  backgrounds; scene concepts: the concept's background colour with another pattern; never dots,
  which the base model does not draw).

Each concept is also drawn **from words** ("a photo of a pink cross on a cyan background") over
the same seeds: a concept the model cannot draw from words is reported but not counted, because
it measures the model, not training. The untrained embedding (init text) is measured on both
prompts, and **time to concept** is the training process's CPU seconds (start-up included) until
the reconstruction of an intermediate embedding first reaches 75%. A spot check loads each final
`.safetensors` into diffusers' own `load_textual_inversion` and judges the same seeds again.

Two kinds of concept: **scene** (fixed shape, colour, background pattern and colour, as
`examples/concept/`) and **object** (fixed shape and colour on backgrounds that vary over the 8
images, as a user's photos of their own object). The 16 concepts cover every shape, shape colour,
background pattern and background colour, and are split once into a **tuning half** (choose recipe
changes on it) and a **report half** (report them on it too).

    python benchmarks/concepts.py --half tuning --json output/concepts/tuning.json
    python benchmarks/concepts.py --half report --masks          # trained with object masks
    python benchmarks/concepts.py --quick                        # 2 concepts, few steps (the test)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
                           TQDM_DISABLE="1")  # 16 training runs' progress bars would bury the table

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from benchmarks import quality  # noqa: E402
from toy_world import world  # noqa: E402
from toy_world.data import make_scenes, write_example_folder  # noqa: E402

PASS = 0.75  # captured / editable / drawable: at least this share of the judged images match
TRAIN_IMAGES = 8
EVAL_EVERY = 100  # intermediate embeddings judged for time to concept

# The README quickstart's flags without its data, name and init (quality.CONCEPT_TRAINING_FLAGS).
_OWN = {"--train_data_dir", "--placeholder_token", "--initializer_token"}
RECIPE_FLAGS = tuple(
    item for pair in zip(quality.CONCEPT_TRAINING_FLAGS[::2], quality.CONCEPT_TRAINING_FLAGS[1::2])
    if pair[0] not in _OWN for item in pair
)

# Edits ask only for patterns the base model draws from words: it barely draws dots (asked in words
# for a dotted magenta background, it drew a plain one: the object edits' words baseline stuck at
# 66-75%; docs/toy_world.md), so an edit into dots would measure the model, not training.
EDIT_PATTERNS = tuple(b for b in world.BACKGROUNDS if b != "dotted")
# Backgrounds asked for in object edits: their colours are never shape colours, so each is a valid
# background for every concept, and together they use every drawn pattern.
OBJECT_EDITS = (("striped", "teal"), ("plain", "magenta"), ("checkered", "silver"), ("plain", "brown"))


@dataclass(frozen=True)
class Concept:
    """One concept of the suite: what its 8 training images fix, and which half it belongs to."""

    name: str  # also the placeholder token: not a word of the toy vocabulary
    kind: str  # "scene" | "object"
    shape: str
    colour: str
    background: str = ""  # scene concepts only
    background_colour: str = ""
    half: str = "tuning"

    @property
    def target(self) -> dict[str, str]:
        """What reconstruction must show: everything the training images share."""
        fixed = {"shape": self.shape, "colour": self.colour}
        if self.kind == "scene":
            fixed |= {"background": self.background, "background_colour": self.background_colour}
        return fixed

    @property
    def init_text(self) -> str:
        """The README recipe's init: the concept's shape word."""
        return self.shape

    def scenes(self, count: int = TRAIN_IMAGES) -> list[world.Scene]:
        """The training scenes: fixed attributes, everything else jittered (objects: backgrounds too)."""
        return make_scenes(f"concepts/{self.name}", count, outline=False, **self.target)

    def words(self) -> str:
        """The concept in the model's own words (what "from words" draws)."""
        if self.kind == "object":
            return f"{world.article(self.colour)} {self.colour} {self.shape}"
        return world.prompt_for(self.shape, self.colour, self.background, self.background_colour)

    def edits(self, count: int) -> list[tuple[str, dict[str, str]]]:
        """(background phrase, target) per seed: what an edit asks, in runs of equal prompts."""
        if self.kind == "object":
            options = [(world.background_phrase(b, c), {"background": b, "background_colour": c}) for b, c in OBJECT_EDITS]
        else:
            options = [(world.background_phrase(b, self.background_colour), {"background": b})
                       for b in EDIT_PATTERNS if b != self.background]
        chosen = [options[index * len(options) // count] for index in range(count)]
        return [(phrase, {**self.target, **changed}) for phrase, changed in chosen]


def _scene(name, shape, colour, background, background_colour, half):
    return Concept(name, "scene", shape, colour, background, background_colour, half)


def _object(name, shape, colour, half):
    return Concept(name, "object", shape, colour, half=half)


# Every shape in each half; over both halves every shape colour, pattern and background colour.
CONCEPTS = (
    _scene("toy-s01", "square", "orange", "checkered", "cyan", "tuning"),
    _scene("toy-s02", "cross", "blue", "dotted", "brown", "tuning"),
    _scene("toy-s03", "star", "yellow", "plain", "magenta", "tuning"),
    _scene("toy-s04", "triangle", "purple", "striped", "teal", "tuning"),
    _object("toy-o01", "triangle", "red", "tuning"),
    _object("toy-o02", "ring", "blue", "tuning"),
    _object("toy-o03", "circle", "white", "tuning"),
    _object("toy-o04", "square", "pink", "tuning"),
    _scene("toy-s05", "circle", "red", "striped", "silver", "report"),
    _scene("toy-s06", "ring", "green", "checkered", "gray", "report"),
    _scene("toy-s07", "square", "white", "dotted", "magenta", "report"),
    _scene("toy-s08", "cross", "pink", "plain", "cyan", "report"),
    _object("toy-o05", "cross", "purple", "report"),
    _object("toy-o06", "triangle", "orange", "report"),
    _object("toy-o07", "star", "green", "report"),
    _object("toy-o08", "circle", "yellow", "report"),
)
QUICK = ("toy-s01", "toy-o01")


# ---------------------------------------------------------------- cases


def reconstruction_cases(concept: Concept, subject: str, count: int) -> list[quality.Case]:
    """"a photo of <subject>" over `count` seeds, judged on the whole concept."""
    return quality.concept_cases(f"a photo of {subject}", concept.target, count)


def edit_cases(concept: Concept, subject: str, count: int) -> list[quality.Case]:
    """"a photo of <subject> on a <background> background": the concept and the asked background.
    The same seeds as the reconstruction, so the two differ only by the prompt."""
    seeds = [case.seed for case in quality.concept_cases("", {}, count)]
    return [quality.Case(f"a photo of {subject} on a {phrase} background", seed, target)
            for seed, (phrase, target) in zip(seeds, concept.edits(count))]


def words_edit_cases(concept: Concept, count: int) -> list[quality.Case]:
    """The edits drawn from words: each edit's target in the model's own words, same seeds and
    targets as `edit_cases`. For an object this is `edit_cases` with the concept in words; for a
    scene the asked background replaces the concept's (the concept's words already name one, and
    a prompt with two backgrounds is not what the edit asks)."""
    return [quality.Case(f"a photo of {world.prompt_for(**case.target)}", case.seed, case.target)
            for case in edit_cases(concept, "", count)]


# ---------------------------------------------------------------- training


@dataclass
class Training:
    """What one training run left: the final file, intermediate files and CPU seconds per step."""

    final: Path
    intermediate: dict[int, Path]
    cpu_seconds: dict[int, float]
    wall_seconds: dict[int, float]


def write_data(concept: Concept, folder: Path, masks: bool, captions: bool = False) -> Path:
    """The concept's 8 training images, with `-masklabel.png` files if `masks`.

    No captions by default. With `captions`, each image's `.txt` names what is *not* the concept:
    an object concept's background ("on a striped teal background"), nothing for a scene concept
    (its background is part of it). That is how users caption a concept (describe what should stay
    promptable), and it gives `--caption_dropout` a caption to drop."""
    scenes = concept.scenes()
    texts = None
    if captions:
        texts = [f"on a {world.background_phrase(scene.background, scene.background_colour)} background"
                 if concept.kind == "object" else "" for scene in scenes]
    return write_example_folder(folder, scenes, captions=texts, masks=masks)


def train(concept: Concept, model: Path, data: Path, output_dir: Path, extra_flags: Sequence[str],
          save_every: int) -> Training:
    """Train with the README recipe (plus `extra_flags`, which win); time every step."""
    from tinv_lib.training.loop import train as run_training
    from tinv_lib.training.runner import prepare_process
    from tinv_lib.training.task import TrainingHooks
    from tinv_lib.training.textual_inversion import TextualInversionTask, parse_args

    argv = ["--pretrained_model_name_or_path", str(model), *RECIPE_FLAGS, "--train_data_dir", str(data),
            "--placeholder_token", concept.name, "--initializer_token", concept.init_text,
            "--output_dir", str(output_dir), "--save_steps", str(save_every), "--validation_steps", "0",
            "--checkpointing_steps", "0", "--report_to", "none", *extra_flags]
    args = parse_args(argv)
    cpu, wall = {}, {}
    cpu_start, wall_start = time.process_time(), time.perf_counter()

    def on_step(report) -> None:
        cpu[report.step], wall[report.step] = time.process_time() - cpu_start, time.perf_counter() - wall_start

    prepare_process()
    if run_training(args, TextualInversionTask(args), hooks=TrainingHooks(on_step=on_step)) != 0:
        raise RuntimeError(f"training {concept.name} failed")
    intermediate = {int(p.stem.rsplit("-", 1)[1]): p for p in (output_dir / "embeddings").glob(f"{concept.name}-*.pt")}
    best = output_dir / f"{concept.name}-best.safetensors"  # --keep_best: the file a user would keep
    return Training(best if args.keep_best and best.is_file() else output_dir / f"{concept.name}.pt", intermediate,
                    cpu, wall)


# ---------------------------------------------------------------- measuring


def kept_result(result: dict) -> dict:
    """The part of a `run_cases` result worth keeping: match rate, per attribute and per image (in
    case order, so an edit can be compared with the same prompt and seed drawn from words)."""
    return {"match": result["match"], "per_attribute": result["per_attribute"], "seen": result["seen"],
            "matches": [bool(m) for m in result["matches"]]}


def load_trained(file: Path, name: str):
    """A trained file as the embedding `name`: the prompts ask for the concept's name, whatever the
    file is called (`--keep_best` writes `<name>-best.safetensors`, whose own name has the suffix)."""
    from tinv_lib.embeddings.formats import load_embedding

    embedding = load_embedding(file)
    embedding.name = name
    return embedding


def time_to_concept(concept: Concept, pipe, judge, training: Training, count: int, sampling: dict) -> dict:
    """Judge intermediate embeddings in step order; the first to reach `PASS` gives the time."""

    cases = reconstruction_cases(concept, concept.name, count)
    curve = {}
    for step in sorted(training.intermediate):
        embedding = load_trained(training.intermediate[step], concept.name)
        generate = quality.tinv_generator(pipe, embeddings={concept.name: embedding}, **sampling)
        curve[step] = quality.run_cases(generate, cases, judge)["match"]
        if curve[step] >= PASS:
            return {"step": step, "cpu_seconds": round(training.cpu_seconds[step], 1),
                    "wall_seconds": round(training.wall_seconds[step], 1), "curve": curve}
    return {"step": None, "cpu_seconds": None, "wall_seconds": None, "curve": curve}


def diffusers_spot_check(concept: Concept, model: Path, judge, final_file: Path, tinv_images, count: int,
                         sampling: dict) -> dict:
    """The final `.safetensors` through diffusers' `load_textual_inversion`, same seeds: its judged
    rate and its largest pixel difference from tinv's own images."""
    import numpy as np

    from toy_world.pipeline import load_toy_pipeline

    pipe = load_toy_pipeline(model)
    load_in_diffusers(pipe, final_file.with_suffix(".safetensors"), concept.name)
    cases = reconstruction_cases(concept, concept.name, count)
    result = quality.run_cases(quality.pipeline_generator(pipe, sampling["steps"], sampling["guidance_scale"]),
                               cases, judge)
    difference = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
                     for a, b in zip(result["images"], tinv_images))
    return {"n": count, "match": result["match"], "max_pixel_difference": difference}


def load_in_diffusers(pipe, file: Path, token: str) -> None:
    """diffusers' own `load_textual_inversion`: once for SD 1.x, once per encoder for SDXL and
    FLUX.1 (its documented way: each encoder's vectors, by the file's key, into that encoder)."""
    from safetensors.torch import load_file

    from tinv_lib.models.architecture import of_pipeline

    encoders = of_pipeline(pipe).encoders
    if len(encoders) == 1:
        pipe.load_textual_inversion(str(file), token=token)
        return
    state = load_file(str(file))
    for slot in (slot for slot in encoders if slot.embedding_key in state):
        pipe.load_textual_inversion(state[slot.embedding_key], token=token, text_encoder=getattr(pipe, slot.text_encoder),
                                    tokenizer=getattr(pipe, slot.tokenizer))


def measure_concept(concept: Concept, options: dict) -> dict:
    """Everything the suite knows about one concept: from words, untrained, trained, time, spot check."""
    from tinv_lib.embeddings.create import create_embedding
    from tinv_lib.embeddings.diagnostics import diagnose_embedding, vocabularies_of, warnings_for
    from tinv_lib.models.family import family_of
    from toy_world.judge import load_judge
    from toy_world.pipeline import load_toy_pipeline

    torch.set_num_threads(options["threads"])
    model, count, sampling = options["model"], options["num_seeds"], options["sampling"]
    pipe, judge = load_toy_pipeline(model), load_judge(model / "judge")
    folder = options["work_dir"] / concept.name
    data = write_data(concept, folder / "data", options["masks"], options["captions"])
    training = train(concept, model, data, folder / "run", options["train_flags"], options["eval_every"])
    trained = load_trained(training.final, concept.name)
    family = family_of(pipe)
    untrained = create_embedding(concept.name, family, concept.init_text, trained.vector_count)

    def judged(subject: str, embedding=None, edits: list[quality.Case] | None = None) -> dict:
        generate = quality.tinv_generator(pipe, embeddings={concept.name: embedding} if embedding else None, **sampling)
        return {"reconstruction": quality.run_cases(generate, reconstruction_cases(concept, subject, count), judge),
                "edit": quality.run_cases(generate, edits or edit_cases(concept, subject, count), judge)}

    results = {"words": judged(concept.words(), edits=words_edit_cases(concept, count)),
               "untrained": judged(concept.name, untrained),
               "trained": judged(concept.name, trained)}
    spot = options["spot_check"]
    vocabularies = vocabularies_of(family)
    diagnosis = diagnose_embedding(trained.vectors, vocabularies, untrained.vectors)
    report = {
        "concept": asdict(concept), "target": concept.target,
        **{label: {kind: kept_result(r) for kind, r in parts.items()} for label, parts in results.items()},
        "time_to_concept": time_to_concept(concept, pipe, judge, training, count, sampling),
        "steps_run": max(training.cpu_seconds),  # below --max_train_steps when --early_stopping stopped the run
        "judged_step": trained.step,  # the final file's, or with --keep_best the best step's
        "training_cpu_seconds": round(training.cpu_seconds[max(training.cpu_seconds)], 1),
        "training_wall_seconds": round(training.wall_seconds[max(training.wall_seconds)], 1),
        "diffusers": diffusers_spot_check(concept, model, judge, training.final,
                                          results["trained"]["reconstruction"]["images"][:spot], spot, sampling)
        if spot else None,
        "embedding": str(training.final),
        "diagnostics": [record.as_dict() for record in diagnosis],
        "warnings": warnings_for(concept.name, diagnosis),
    }
    if options["save_grids"]:
        _save_grids(options["save_grids"] / concept.name, results)
    return report


def _save_grids(folder: Path, results: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for label, parts in results.items():
        for kind, result in parts.items():
            quality.image_grid(result["images"]).save(folder / f"{label}-{kind}.png")


# ---------------------------------------------------------------- report


def verdicts(report: dict) -> dict[str, bool]:
    """Drawable (from words), captured and editable, each at `PASS`."""
    return {"drawable": report["words"]["reconstruction"]["match"] >= PASS,
            "captured": report["trained"]["reconstruction"]["match"] >= PASS,
            "editable": report["trained"]["edit"]["match"] >= PASS}


def drawable_edits(report: dict) -> tuple[int, int] | None:
    """The trained embedding's edits counted only on edit prompts the model draws from words (the
    same prompt with the concept in words matches in at least `PASS` of its seeds): (matches, images).
    None for a report without per-image matches (suite JSONs written before they were kept)."""
    words, trained = report["words"]["edit"].get("matches"), report["trained"]["edit"].get("matches")
    if words is None or trained is None:
        return None
    phrases = [phrase for phrase, _ in Concept(**report["concept"]).edits(len(words))]
    drawable = {p for p in set(phrases)
                if statistics.mean(w for w, q in zip(words, phrases) if q == p) >= PASS}
    chosen = [t for t, p in zip(trained, phrases) if p in drawable]
    return sum(chosen), len(chosen)


def summarize(reports: Sequence[dict]) -> dict:
    """Counts over the concepts the model draws from words (the others are listed, not counted)."""
    drawable = [r for r in reports if verdicts(r)["drawable"]]
    objects = [r for r in drawable if r["concept"]["kind"] == "object"]
    times = [r["time_to_concept"]["cpu_seconds"] for r in drawable if r["time_to_concept"]["cpu_seconds"] is not None]
    return {
        "concepts": len(reports), "drawable": len(drawable),
        "captured": sum(verdicts(r)["captured"] for r in drawable),
        "captured_in_2_cpu_minutes": sum(t <= 120 for t in times),
        "objects": len(objects), "objects_editable": sum(verdicts(r)["editable"] for r in objects),
        "scenes_editable": sum(verdicts(r)["editable"] for r in drawable if r["concept"]["kind"] == "scene"),
        "median_cpu_seconds_to_concept": statistics.median(times) if times else None,
        "not_drawable": [r["concept"]["name"] for r in reports if not verdicts(r)["drawable"]],
    }


def _pair(report: dict, label: str) -> str:
    return f"{report[label]['reconstruction']['match']:>4.0%} / {report[label]['edit']['match']:>4.0%}"


def _norm_ratio(report: dict) -> str:
    """The longest vector's norm over the vocabulary's median norm (the diagnostics' override number)."""
    return f"{max(d['norm_ratio'] for d in report['diagnostics']):.1f}"


def format_table(reports: Sequence[dict]) -> str:
    """One row per concept: words / untrained / trained, reconstruction and edit, time to concept."""
    head = (f"{'concept':<8} {'kind':<6} {'half':<6} {'what':<38} {'words':>11} {'untrained':>11} {'trained':>11} "
            f"{'to 75%':>12} {'norm×':>5}  missed")
    lines = [head, "  (each pair: reconstruction / edit, % of images matching)"]
    for r in reports:
        c = r["concept"]
        ttc = r["time_to_concept"]
        when = f"{ttc['step']} {ttc['cpu_seconds']:.0f}s" if ttc["step"] else "never"
        missed = ", ".join(f"{k} {v:.0%}" for k, v in r["trained"]["reconstruction"]["per_attribute"].items() if v < PASS)
        what = Concept(**c).words().removeprefix("a ").removeprefix("an ")
        flag = "" if verdicts(r)["drawable"] else " (not drawable)"
        lines.append(f"{c['name']:<8} {c['kind']:<6} {c['half']:<6} {what[:38]:<38} {_pair(r, 'words'):>11} "
                     f"{_pair(r, 'untrained'):>11} {_pair(r, 'trained'):>11} {when:>12} {_norm_ratio(r):>5}  {missed}{flag}")
    return "\n".join(lines)


def format_summary(half: str, summary: dict) -> str:
    time = summary["median_cpu_seconds_to_concept"]
    return (f"{half}: captured {summary['captured']}/{summary['drawable']} drawable concepts "
            f"({summary['captured_in_2_cpu_minutes']} within 2 CPU-minutes); object concepts editable "
            f"{summary['objects_editable']}/{summary['objects']}; scene concepts editable "
            f"{summary['scenes_editable']}; median time to concept "
            f"{'-' if time is None else f'{time:.0f} CPU-s'}; not drawable from words: "
            f"{', '.join(summary['not_drawable']) or 'none'}")


# ---------------------------------------------------------------- diagnostics against the judge


def outcome(report: dict) -> str | None:
    """What the judge says of a drawable concept's final embedding: "failed" (reconstruction under
    `PASS`: it trained but does nothing), "overrode" (captured, but its edits reach under 3/4 of
    what the same edits reach from words: it swallows the prompt), or "worked"; None when the model
    cannot draw the concept from words."""
    if not verdicts(report)["drawable"]:
        return None
    if not verdicts(report)["captured"]:
        return "failed"
    return "overrode" if report["trained"]["edit"]["match"] < 0.75 * report["words"]["edit"]["match"] else "worked"


def warnings_fired(report: dict) -> set[str]:
    """Which of the trainer's warnings (`diagnostics.warnings_for`) fire on the final embedding."""
    from tinv_lib.embeddings.diagnostics import VectorDiagnosis, warnings_for

    records = [VectorDiagnosis(**{**d, "nearest": tuple(map(tuple, d["nearest"]))}) for d in report["diagnostics"]]
    lines = warnings_for("embedding", records)
    return {kind for kind, phrase in (("barely moved", "barely moved"), ("overrides", "override prompts"))
            if any(phrase in line for line in lines)}


def format_warning_table(reports: Sequence[dict]) -> str:
    """How often each warning fires on the embeddings that failed, overrode or worked."""
    groups: dict[str, list[dict]] = {"failed": [], "overrode": [], "worked": []}
    for report in reports:
        if (kind := outcome(report)) is not None:
            groups[kind].append(report)
    lines = ["| warning | " + " | ".join(f"{kind} ({len(g)})" for kind, g in groups.items()) + " |",
             "|---|" + "---|" * len(groups)]
    for warning in ("barely moved", "overrides"):
        cells = [f"{sum(warning in warnings_fired(r) for r in g)} of {len(g)}" for g in groups.values()]
        lines.append(f"| {warning} | " + " | ".join(cells) + " |")
    for kind, group in groups.items():
        if group:
            ratios = sorted(max(d["norm_ratio"] for d in r["diagnostics"]) for r in group)
            cosines = sorted(min(d["cosine_to_init"] for d in r["diagnostics"]) for r in group)
            lines.append(f"{kind}: longest vector {ratios[0]:.1f}-{ratios[-1]:.1f}x the median norm "
                         f"(median {statistics.median(ratios):.1f}x), lowest cosine to init "
                         f"{cosines[0]:.2f}-{cosines[-1]:.2f}")
    return "\n".join(lines)


def read_reports(paths: Sequence[Path]) -> list[dict]:
    """Every concept report in suite JSON files (`--json`), for `--warnings_table`."""
    return [report for path in paths for report in json.loads(path.read_text(encoding="utf-8"))["concepts"]
            if "diagnostics" in report]  # older files lack them


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=quality.DEFAULT_MODEL_DIR, help="toy model folder (with judge/)")
    parser.add_argument("--half", choices=["tuning", "report", "all"], default="all", help="which concepts to run")
    parser.add_argument("--concepts", nargs="+", help="only these concept names (e.g. toy-s01 toy-o03)")
    parser.add_argument("--quick", action="store_true",
                        help="2 concepts, 20 training steps, 2 seeds, 4 sampling steps: checks the plumbing only")
    parser.add_argument("--num_seeds", type=int, default=32, help="images per measurement")
    parser.add_argument("--steps", type=int, default=quality.DEFAULT_STEPS, help="sampling steps")
    parser.add_argument("--guidance_scale", type=float, default=quality.DEFAULT_GUIDANCE)
    parser.add_argument("--train_flags", default="", help='extra training flags, e.g. "--learning_rate 0.002" (they win)')
    parser.add_argument("--masks", action="store_true", help="write -masklabel.png object masks beside the images")
    parser.add_argument("--captions", action="store_true",
                        help="caption object concepts' images with their background (train with a [filewords] "
                             "template, e.g. --train_flags \"--template_file subject_filewords\")")
    parser.add_argument("--eval_every", type=int, default=EVAL_EVERY, help="steps between judged intermediate files")
    parser.add_argument("--spot_check", type=int, default=8, help="seeds re-made through diffusers (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="concepts measured in parallel (one thread each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: 1 with workers, else 2)")
    parser.add_argument("--work_dir", type=Path, default=Path("output/concepts"), help="data and runs (replaced)")
    parser.add_argument("--save_grids", type=Path, default=None, help="folder for grids of every measurement")
    parser.add_argument("--json", type=Path, default=None, help="write every result as JSON")
    parser.add_argument("--warnings_table", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: print how often each diagnostics warning fires on the failed, "
                             "overriding and working embeddings of these suite JSON files")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_seeds, args.steps, args.eval_every, args.spot_check = 2, 4, 10, 2
        args.train_flags = f"--max_train_steps 20 {args.train_flags}"
        args.concepts = args.concepts or list(QUICK)
    return args


def chosen_concepts(args: argparse.Namespace) -> list[Concept]:
    if args.concepts:
        unknown = set(args.concepts) - {c.name for c in CONCEPTS}
        if unknown:
            raise SystemExit(f"error: unknown concepts {', '.join(sorted(unknown))}")
        return [c for c in CONCEPTS if c.name in args.concepts]
    return [c for c in CONCEPTS if args.half in ("all", c.half)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warnings_table:
        print(format_warning_table(read_reports(args.warnings_table)))
        return 0
    concepts = chosen_concepts(args)
    workers = max(1, min(args.workers, len(concepts)))
    options = {"model": args.model.resolve(), "num_seeds": args.num_seeds, "work_dir": args.work_dir.resolve(),
               "sampling": {"steps": args.steps, "guidance_scale": args.guidance_scale},
               "train_flags": shlex.split(args.train_flags), "masks": args.masks, "captions": args.captions,
               "eval_every": args.eval_every,
               "spot_check": min(args.spot_check, args.num_seeds), "save_grids": args.save_grids,
               "threads": args.threads or (1 if workers > 1 else 2)}
    print(f"{len(concepts)} concepts, {args.num_seeds} seeds, {args.steps} steps, CFG {args.guidance_scale}, "
          f"flags: {' '.join(RECIPE_FLAGS)} {args.train_flags}{' (masks)' if args.masks else ''}"
          f"{' (captions)' if args.captions else ''}", flush=True)
    started = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            reports = list(pool.map(measure_concept, concepts, [options] * len(concepts)))
    else:
        reports = [measure_concept(concept, options) for concept in concepts]
    print(format_table(reports))
    halves = sorted({c.half for c in concepts}, key=("tuning", "report").index)
    summaries = {half: summarize([r for r in reports if r["concept"]["half"] == half]) for half in halves}
    for half, summary in summaries.items():
        print(format_summary(half, summary))
    print(f"({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"flags": [*RECIPE_FLAGS, *options["train_flags"]], "masks": args.masks, "captions": args.captions,
                   "seeds": args.num_seeds, "summaries": summaries, "concepts": reports}
        args.json.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
