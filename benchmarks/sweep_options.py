"""Which kohya / OneTrainer options help textual inversion? Each one against the README recipe,
on the concept suite's tuning half.

Every variant adds its flags to the recipe (`quality.CONCEPT_TRAINING_FLAGS`; the variants
measured against the recipe before issue 35 halved its steps and made direction-only training the
default carry that recipe's flags, `BEFORE_35`) and runs
`concepts.py` on the tuning half's concepts that the model draws from words (the others measure
the model, not training), with the same seeds, judge and sampling. A variant's results are kept
in `<work_dir>/<variant>.json` and not run again, so a sweep stopped half-way goes on where it
stopped. The table compares: concepts captured, object concepts editable, median training steps and
CPU seconds to concept (the first judged file, every 200 steps, that reaches 75%; CPU seconds
also grow with the machine's load), mean reconstruction and edit rates (edits of scenes and of
objects apart), the longest vector's norm over the vocabulary's median (median over the
concepts), and the median steps run (fewer than the recipe's with `--early_stopping`; with
`--keep_best` the best step's file is the one judged).

    python benchmarks/sweep_options.py                       # every variant, then the table
    python benchmarks/sweep_options.py --variants snr5 prodigy
    python benchmarks/sweep_options.py --table_only          # the table of what has been run
    python benchmarks/sweep_options.py --model models/toy-xl --concepts toy-s05 toy-s06 toy-o06 toy-o07 toy-o08 \
        --work_dir output/sweep-xl-report --variants recipe keep_best      # another model or half
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(HF_HUB_OFFLINE="1")

from benchmarks import concepts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRAWABLE_TUNING = ["toy-s01", "toy-s04", "toy-o01", "toy-o02", "toy-o03", "toy-o04"]

# The recipe before issue 35 made direction-only training at the init norm the default and
# halved its steps: the variants measured against that recipe (docs/training.md) carry its flags.
BEFORE_35 = "--norm_mode none --max_train_steps 1000"

# name -> extra training flags (the recipe's own flags are the baseline's)
VARIANTS = {
    "recipe": "",
    "recipe_before_35": BEFORE_35,
    "snr5": f"{BEFORE_35} --snr_gamma 5",
    "snr1": f"{BEFORE_35} --snr_gamma 1",
    "offset005": f"{BEFORE_35} --noise_offset 0.05",
    "offset01": f"{BEFORE_35} --noise_offset 0.1",
    "prodigy": f"{BEFORE_35} --optimizer prodigy --learning_rate 1",
    "adafactor": f"{BEFORE_35} --optimizer adafactor",
    "schedulefree": f"{BEFORE_35} --optimizer schedulefree_adamw",
    "adamw8bit": f"{BEFORE_35} --optimizer adamw8bit",
    "ema099": f"{BEFORE_35} --ema_decay 0.99 --save_ema",
    "ema0999": f"{BEFORE_35} --ema_decay 0.999 --save_ema",
    "t_min200": f"{BEFORE_35} --min_timestep 200",
    "t_max800": f"{BEFORE_35} --max_timestep 800",
    "captions": f"{BEFORE_35} --template_file subject_filewords",
    "captions_drop01": f"{BEFORE_35} --template_file subject_filewords --caption_dropout 0.1",
    "captions_drop03": f"{BEFORE_35} --template_file subject_filewords --caption_dropout 0.3",
    # issue 35: norm control (docs/training.md, "Norm control, early stopping and the best step")
    "norm_preserve": f"{BEFORE_35} --norm_mode preserve --norm_target vocab_median",
    "norm_direction": f"{BEFORE_35} --norm_mode direction --norm_target vocab_median",
    "norm_direction_init": "--max_train_steps 1000 --norm_mode direction --norm_target init",
    "norm_preserve_x3": "--max_train_steps 1000 --norm_mode preserve --norm_target 3",
    # issue 35: DVAR on the training images' fixed-batch loss every 10 steps (20 in a 200-step window),
    # and the best step by that loss every 50 steps
    "dvar": f"{BEFORE_35} --early_stopping dvar --validation_loss_steps 10",
    "keep_best": f"{BEFORE_35} --keep_best --validation_loss_steps 50",
    # issue 35: half the steps at twice the rate (the recipe's slowest concept, toy-s01, is captured
    # at step 600-800 of 1000; the rest by step 200)
    "half_steps": "--norm_mode none --max_train_steps 500 --learning_rate 0.01",
    "direction_init_500": "--norm_mode direction --norm_target init --max_train_steps 500",
    "direction_init_500_t200": "--norm_mode direction --norm_target init --max_train_steps 500 --min_timestep 200",
    # issue 35, point 4: runs meant to override their prompts (to validate the "overrides" warning)
    "override_lr05": f"{BEFORE_35} --learning_rate 0.05",
    "override_v16": f"{BEFORE_35} --num_vectors 16 --learning_rate 0.02",
}
# Caption dropout needs captions: these variants caption each object concept's images with its
# background (`concepts.py --captions`), and compare with and without dropping them. Their
# baseline is "captions", not the (uncaptioned) README recipe.
CAPTIONED = {"captions", "captions_drop01", "captions_drop03"}


def run_variant(name: str, work_dir: Path, workers: int, model: Path, names: list[str]) -> Path:
    """Run `concepts.py` for one variant unless its JSON exists; the JSON's path."""
    result = work_dir / f"{name}.json"
    if result.is_file():
        return result
    command = [sys.executable, str(ROOT / "benchmarks" / "concepts.py"), "--model", str(model), "--concepts", *names,
               "--workers", str(workers), "--spot_check", "0", "--eval_every", "200",
               "--work_dir", str(work_dir / name), "--json", str(result)]
    if VARIANTS[name]:
        command += ["--train_flags", VARIANTS[name]]
    if name in CAPTIONED:
        command.append("--captions")
    with open(work_dir / f"{name}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return result


def row(name: str, data: dict) -> str:
    """One table row from a `concepts.py` JSON."""
    summary = next(iter(data["summaries"].values()))
    reports = [r for r in data["concepts"] if r["words"]["reconstruction"]["match"] >= 0.75]
    reconstruction = statistics.mean(r["trained"]["reconstruction"]["match"] for r in reports)
    edits = {kind: statistics.mean(r["trained"]["edit"]["match"] for r in reports if r["concept"]["kind"] == kind)
             for kind in ("scene", "object")}
    norm = statistics.median(max(d["norm_ratio"] for d in r["diagnostics"]) for r in reports)
    steps = [r["time_to_concept"]["step"] for r in reports if r["time_to_concept"]["step"] is not None]
    seconds = summary["median_cpu_seconds_to_concept"]
    runs = [r["steps_run"] for r in reports if "steps_run" in r]  # JSONs from before issue 35 lack it
    counted = [concepts.drawable_edits(r) for r in reports if r["concept"]["kind"] == "scene"]
    drawable_scene_edits = ("-" if not counted or None in counted
                            else f"{sum(c[0] for c in counted)}/{sum(c[1] for c in counted)}")
    flags = f"`{VARIANTS[name]}`" if VARIANTS[name] else "README recipe"
    if name in CAPTIONED:
        flags += ", object images captioned with their background"
    return (f"| {flags} | {summary['captured']}/{summary['drawable']} | {summary['objects_editable']}/{summary['objects']} "
            f"| {f'{statistics.median(steps):.0f}' if steps else '-'} | {'-' if seconds is None else f'{seconds:.0f}'} "
            f"| {reconstruction:.0%} | {edits['scene']:.0%} | {drawable_scene_edits} | {edits['object']:.0%} | {norm:.1f} "
            f"| {f'{statistics.median(runs):.0f}' if runs else '-'} |")


def table(work_dir: Path, names: list[str]) -> str:
    lines = ["| variant | captured | objects editable | median steps to concept | median CPU-s to concept "
             "| mean reconstruction | mean edit, scenes | scene edits the model draws from words "
             "| mean edit, objects | norm × median | median steps run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        path = work_dir / f"{name}.json"
        if path.is_file():
            lines.append(row(name, json.loads(path.read_text())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--work_dir", type=Path, default=ROOT / "output" / "sweep")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "toy", help="toy model folder (with judge/)")
    parser.add_argument("--concepts", nargs="+", default=DRAWABLE_TUNING,
                        help="suite concepts to train (default: the tuning half's drawable ones on models/toy)")
    parser.add_argument("--table_only", action="store_true", help="run nothing: the table of the finished variants")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for name in args.variants:
            run_variant(name, args.work_dir, args.workers, args.model, args.concepts)
            print(f"{name}: done", flush=True)
    print(table(args.work_dir, args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
