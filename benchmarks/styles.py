"""Hypernetwork style suite on the toy world: does the README recipe learn styles it was not tuned on?

`quality.py` measures one hypernetwork style, the colour shift the README recipe was tuned on.
This suite trains one hypernetwork per style of `toy_world.examples.STYLES`, each with
exactly the README recipe (`quality.STYLE_TRAINING_FLAGS`, only the data folder and the name its
own), on 64 scenes whose one attribute is drawn as another value of its list while the caption
names the value asked for (a style the base model never shows):

* **colour-shift**: the shape in the next colour (red -> orange -> ... -> white -> red);
* **pattern-cycle**: the background pattern (plain -> striped -> checkered -> plain; dotted, which
  the base model does not draw, is outside the style);
* **shape-swap-pairs**: the shape, in pairs (circle <-> ring, square <-> cross, triangle <-> star);
* **background-shift**: the background colour (gray -> silver -> brown -> teal -> cyan -> magenta -> gray).

Each is measured like quality.py's row 3 on the 64 ordinary prompts (`quality.prompt_following_cases`),
less those asking for a value outside the style (pattern-cycle: the dotted ones): with
`<hypernet:NAME:1>` the judge must see the shifted value of the prompt's ask (pass: 75%), with
`<hypernet:NAME:0>` at most 10%, and at multiplier 1 the *guard* attribute (one the style leaves
alone: the shape, or for the shape swap the colour) must be right in at least 80% of multiplier 0's
rate. The training data is written under `--work_dir` (not committed). Exit status 0 when every
style meets all three marks. The failed first designs (`ALTERNATIVE_STYLES`: pattern-swap,
shape-swap, pattern-swap-no-dots) run by name.

    python benchmarks/styles.py --json output/styles/styles.json --save_grids output/styles/grids
    python benchmarks/styles.py --styles pattern-swap --threads 1   # one style, e.g. an alternative
    python benchmarks/styles.py --train_flags "--early_stopping dvar --keep_best --validation_loss_steps 50"
    python benchmarks/styles.py --quick          # 2 styles, 2 training steps, 2 prompts (the test)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
                           TQDM_DISABLE="1")  # four training runs' progress bars would bury the table

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from benchmarks import quality  # noqa: E402
from toy_world.examples import ALTERNATIVE_STYLES, STYLES, Style, style_named  # noqa: E402
from toy_world.judge import load_judge  # noqa: E402
from toy_world.pipeline import DEFAULT_MODEL_DIR, load_toy_pipeline  # noqa: E402
from toy_world.scoring import JUDGE_SUBFOLDER, score_images  # noqa: E402

STYLE_ON = 0.75  # multiplier 1: at least this share shows the shifted value
STYLE_OFF = 0.10  # multiplier 0: at most this share does
QUICK = {"styles": [s.name for s in STYLES[:2]], "train_steps": 2, "num_prompts": 2, "steps": 4}


def training_flags(style: Style, data_dir: Path, max_train_steps: int | None = None,
                   extra: Sequence[str] = ()) -> list[str]:
    """The README recipe (`quality.STYLE_TRAINING_FLAGS`) with the style's data folder and name
    (and, for the quick test only, fewer steps), then `extra` flags (the last value of a flag wins)."""
    own = {"--train_data_dir": str(data_dir), "--hypernetwork_name": style.name}
    if max_train_steps is not None:
        own["--max_train_steps"] = str(max_train_steps)
    flags = list(quality.STYLE_TRAINING_FLAGS)
    for key, value in own.items():
        flags[flags.index(key) + 1] = value
    return flags + list(extra)


def judged_file(style: Style, run_folder: Path, keep_best: bool) -> tuple[Path, int, int]:
    """The folder whose `<name>.pt` is judged, that file's step and the steps run: the final file,
    or with `--keep_best` the best step's file (copied under the name, which `<hypernet:>` asks for)."""
    from tinv_lib.hypernetworks.files import load_hypernetwork

    final = run_folder / f"{style.name}.pt"
    steps_run = load_hypernetwork(final).step
    if not keep_best:
        return run_folder, steps_run, steps_run
    best_folder = run_folder.parent / "best"
    best_folder.mkdir(exist_ok=True)
    shutil.copyfile(run_folder / f"{style.name}-best.pt", best_folder / final.name)
    return best_folder, load_hypernetwork(best_folder / final.name).step, steps_run


def judged_prompts(style: Style, count: int = 64, seed: int = 0) -> list[quality.Case]:
    """quality's `count` ordinary prompts that ask for a value the style shifts: all of them, but for
    a style whose domain is a subset (pattern-cycle leaves out the dotted ones)."""
    return [c for c in quality.prompt_following_cases(count, seed) if style.applies(c.target[style.attribute])]


def style_cases(style: Style, count: int = 64, seed: int = 0) -> list[quality.Case]:
    """The judged prompts, each judged only on the shifted value of what it asks for (for the
    colour shift these are exactly `quality.style_cases`)."""
    return [quality.Case(c.prompt, c.seed, style.target(c.target[style.attribute]))
            for c in judged_prompts(style, count, seed)]


def measure(pipe, judge, style: Style, hypernetwork_dir: Path, count: int = 64, seed: int = 0, **sampling) -> dict:
    """`quality.measure_style` for any style: the prompts with `<hypernet:NAME:M>` for M = 1 and 0,
    judged on the shifted value. Returns {1.0: result, 0.0: result, "on_prompt": {M: result}} (the
    same images judged on the guard attribute) and "asked": {M: result} (judged on the value the
    prompt asks for, to tell a style not applied from a damaged image)."""
    from tinv_lib.generation.extra_networks import HypernetworkHandler

    handler = HypernetworkHandler(hypernetwork_dir, notify=lambda message: None)
    prompts = judged_prompts(style, count, seed)
    guard_targets = [{style.guard: c.target[style.guard]} for c in prompts]
    asked_targets = [{style.attribute: c.target[style.attribute]} for c in prompts]
    results: dict = {"on_prompt": {}, "asked": {}}
    generate = quality.tinv_generator(pipe, extra_networks={"hypernet": handler}, **sampling)
    for multiplier in (1.0, 0.0):
        cases = [quality.Case(f"{c.prompt} <hypernet:{style.name}:{multiplier:g}>", c.seed, c.target)
                 for c in style_cases(style, count, seed)]
        result = quality.run_cases(generate, cases, judge)
        results[multiplier] = {**result, "cases": cases}
        for key, targets in (("on_prompt", guard_targets), ("asked", asked_targets)):
            scored = score_images(result["images"], targets, judge)
            results[key][multiplier] = {**scored, "extra": scored["per_attribute"], "images": result["images"],
                                        "seconds": result["seconds"]}
    return results


def per_value(style: Style, result: dict, count: int, seed: int) -> dict[str, str]:
    """Matches per asked value ("plain->striped": "3/16"), to show which steps of the shift fail."""
    asked = [c.target[style.attribute] for c in judged_prompts(style, count, seed)]
    hits, totals = Counter(), Counter(asked)
    for value, match in zip(asked, result["matches"]):
        hits[value] += match
    return {f"{value}->{style.shift[value]}": f"{hits[value]}/{totals[value]}" for value in style.shift if totals[value]}


def verdicts(measured: dict) -> dict[str, bool]:
    """The three marks of one style."""
    guard_bar = quality.ON_PROMPT_SHARE * measured["on_prompt"][0.0]["match"]
    return {
        "multiplier_1": measured[1.0]["match"] >= STYLE_ON,
        "multiplier_0": measured[0.0]["match"] <= STYLE_OFF,
        "on_prompt": measured["on_prompt"][1.0]["match"] >= guard_bar,
    }


HEADER = (f"{'style':<20} {'shifted':<18} {'multiplier 1 (>=75%)':<21} {'multiplier 0 (<=10%)':<21} "
          f"{'on-prompt guard at 1 (>=80% of at 0)':<38} {'train s':>7}")


def row(style: Style, measured: dict, seconds: float) -> str:
    """One table row: the three marks with PASS/FAIL, and the training time."""
    marks = verdicts(measured)
    word = {True: "PASS", False: "FAIL"}
    guard_1, guard_0 = measured["on_prompt"][1.0]["match"], measured["on_prompt"][0.0]["match"]
    guard = (f"{style.guard} {guard_1:.1%} {word[marks['on_prompt']]} "
             f"(>= {quality.ON_PROMPT_SHARE * guard_0:.1%} of {guard_0:.1%})")
    return (f"{style.name:<20} {style.attribute:<18} {measured[1.0]['match']:>6.1%} {word[marks['multiplier_1']]:<14} "
            f"{measured[0.0]['match']:>6.1%} {word[marks['multiplier_0']]:<14} {guard:<38} {seconds:>7.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="toy model folder (with judge/)")
    parser.add_argument("--judge", type=Path, default=None, help="judge folder (default: MODEL/judge)")
    parser.add_argument("--styles", nargs="+", choices=[s.name for s in (*STYLES, *ALTERNATIVE_STYLES)],
                        default=None, help="run only these styles (default: the four of STYLES; --quick: the first "
                        "two; pattern-swap, shape-swap, pattern-swap-no-dots: the failed designs)")
    parser.add_argument("--num_prompts", type=int, default=None, help="prompts per style and multiplier (64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps ({quality.DEFAULT_STEPS})")
    parser.add_argument("--guidance_scale", type=float, default=quality.DEFAULT_GUIDANCE)
    parser.add_argument("--train_steps", type=int, default=None,
                        help="override the recipe's training steps (only --quick does; not the README recipe)")
    parser.add_argument("--train_flags", default="",
                        help='extra training flags, e.g. "--early_stopping dvar --keep_best" (they win; with '
                             '--keep_best the best step\'s file is judged)')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="2 styles, 2 training steps, 2 prompts, 4 sampling steps (plumbing only)")
    parser.add_argument("--work_dir", type=Path, default=Path("output/styles/work"),
                        help="where each style's data and hypernetwork go (replaced each run)")
    parser.add_argument("--save_grids", type=Path, default=None, help="folder for two grid PNGs per style")
    parser.add_argument("--json", type=Path, default=None, help="write every result (per case) as JSON")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"styles": [s.name for s in STYLES], "num_prompts": 64,
                                         "steps": quality.DEFAULT_STEPS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace, log=print) -> dict[str, dict]:
    """Train and measure every chosen style; print the table; write grids and JSON.

    Returns name -> {"style", "train_seconds", "measured" (with images), "passes"}."""
    torch.set_num_threads(args.threads)
    pipe = load_toy_pipeline(args.model)
    judge = load_judge(args.judge or args.model / JUDGE_SUBFOLDER)
    sampling = {"steps": args.steps, "guidance_scale": args.guidance_scale}
    log(f"model {args.model}, {args.num_prompts} prompts, {args.steps} steps, CFG {args.guidance_scale}, "
        f"seed {args.seed}, {torch.get_num_threads()} threads"
        + (f", {args.train_steps} training steps (not the README recipe)" if args.train_steps else ""))
    extra_flags = shlex.split(args.train_flags)
    suite: dict[str, dict] = {}
    rows = []
    for name in args.styles:
        style = style_named(name)
        work = args.work_dir / name
        shutil.rmtree(work, ignore_errors=True)
        data = style.write(work / "data")
        folder, seconds = quality.train_style(args.model, work / "hypernetwork",
                                              training_flags(style, data, args.train_steps, extra_flags))
        folder, judged_step, steps_run = judged_file(style, folder, "--keep_best" in extra_flags)
        measured = measure(pipe, judge, style, folder, args.num_prompts, args.seed, **sampling)
        suite[name] = {"style": style, "train_seconds": seconds, "measured": measured,
                       "judged_step": judged_step, "steps_run": steps_run,
                       "passes": verdicts(measured), "per_value": per_value(style, measured[1.0], args.num_prompts,
                                                                            args.seed)}
        rows.append(row(style, measured, seconds))
        log(f"{name}: trained in {seconds:.0f}s, {steps_run} steps, judged step {judged_step}; at 1 the judge saw {style.attribute} "
            f"{measured[1.0]['seen'][style.attribute]}")
    passed = sum(all(entry["passes"].values()) for entry in suite.values())
    log("")
    log(HEADER)
    for line in rows:
        log(line)
    for name, entry in suite.items():
        asked, judged = entry["measured"]["asked"][1.0]["match"], entry["measured"][1.0]["n"]
        left_out = (f"; judged on {judged} of {args.num_prompts} prompts (the others ask for a value outside "
                    f"its domain)" if judged < args.num_prompts else "")
        log(f"  {name} at 1, per asked value: {', '.join(f'{k} {v}' for k, v in entry['per_value'].items())}; "
            f"the asked value kept in {asked:.1%}{left_out}")
    log(f"{passed} of {len(suite)} styles pass all three marks")
    if args.save_grids:
        args.save_grids.mkdir(parents=True, exist_ok=True)
        for name, entry in suite.items():
            for multiplier in (1.0, 0.0):
                quality.image_grid(entry["measured"][multiplier]["images"]).save(
                    args.save_grids / f"{name}_{multiplier:g}.png")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"settings": {"num_prompts": args.num_prompts, "seed": args.seed, "steps": args.steps,
                          "guidance_scale": args.guidance_scale, "train_steps": args.train_steps,
                          "flags": [*quality.STYLE_TRAINING_FLAGS, *extra_flags]},
             "passed": passed,
             "styles": {name: _jsonable(entry) for name, entry in suite.items()}}, indent=1), encoding="utf-8")
    return suite


def _jsonable(entry: dict) -> dict:
    style, measured = entry["style"], entry["measured"]
    return {
        "attribute": style.attribute, "shift": dict(style.shift), "guard": style.guard,
        "train_seconds": round(entry["train_seconds"], 1), "judged_step": entry["judged_step"],
        "steps_run": entry["steps_run"], "passes": entry["passes"], "per_value": entry["per_value"],
        "multiplier_1": quality._jsonable(measured[1.0]), "multiplier_0": quality._jsonable(measured[0.0]),
        "guard_1": quality._jsonable(measured["on_prompt"][1.0]), "guard_0": quality._jsonable(measured["on_prompt"][0.0]),
        "asked_1": quality._jsonable(measured["asked"][1.0]), "asked_0": quality._jsonable(measured["asked"][0.0]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    suite = run(parse_args(None if argv is None else list(argv)))
    return 0 if all(all(entry["passes"].values()) for entry in suite.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
