"""Every object concept the toy model draws from words, trained once: where does an embedding end
below its own words?

The concept suite has four object concepts per half; a held-out check found object embeddings
that reconstruct less often than the words they started from (e.g. 66% where words give 97%).
This scan looks for such cases in our own data: every shape x colour pair is drawn from words
("a photo of a red triangle") over a few seeds; each pair that passes (`concepts.PASS`) is trained
as an object concept (8 images of that shape and colour on varying backgrounds) with the README
recipe, like `concepts.py`, and its final embedding is judged on the same seeds. The table lists
every trained pair with its words and trained rates, what the judge saw wrong (shape or colour)
and the longest vector's norm over the vocabulary's median, worst first.

    python benchmarks/object_scan.py --json output/object_scan/scan.json     # ~30 min on 2 cores
    python benchmarks/object_scan.py --pairs triangle:red ring:blue --num_seeds 32
    python benchmarks/object_scan.py --pairs ring:blue --captions --train_flags "--template_file subject_filewords"
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")

import torch  # noqa: E402

from benchmarks import concepts, quality  # noqa: E402
from toy_world import world  # noqa: E402


def scan_concept(shape: str, colour: str) -> concepts.Concept:
    """The object concept of one shape x colour pair (its name seeds its training images)."""
    return concepts.Concept(f"scan-{colour}-{shape}", "object", shape, colour, half="scan")


def _judged(pipe, judge, concept: concepts.Concept, subject: str, count: int, sampling: dict, embedding=None) -> dict:
    generate = quality.tinv_generator(pipe, embeddings={concept.name: embedding} if embedding else None, **sampling)
    return concepts.kept_result(quality.run_cases(generate, concepts.reconstruction_cases(concept, subject, count), judge))


def measure_pair(pair: tuple[str, str], options: dict) -> dict:
    """Words first; training and the trained embedding only for a pair the model draws from words."""
    from tinv_lib.embeddings.diagnostics import diagnose_embedding, vocabularies_of
    from tinv_lib.models.family import family_of
    from toy_world.judge import load_judge
    from toy_world.pipeline import load_toy_pipeline

    torch.set_num_threads(options["threads"])
    concept, model, count, sampling = scan_concept(*pair), options["model"], options["num_seeds"], options["sampling"]
    pipe, judge = load_toy_pipeline(model), load_judge(model / "judge")
    report = {"concept": concept.name, "shape": concept.shape, "colour": concept.colour,
              "words": _judged(pipe, judge, concept, concept.words(), count, sampling)}
    if report["words"]["match"] < concepts.PASS:
        return report
    folder = options["work_dir"] / concept.name
    data = concepts.write_data(concept, folder / "data", masks=False, captions=options["captions"])
    training = concepts.train(concept, model, data, folder / "run", options["train_flags"], options["save_every"])
    trained = concepts.load_trained(training.final, concept.name)
    report["trained"] = _judged(pipe, judge, concept, concept.name, count, sampling, trained)
    diagnosis = diagnose_embedding(trained.vectors, vocabularies_of(family_of(pipe)))
    report["norm_ratio"] = max(d.norm_ratio for d in diagnosis)
    report["embedding"] = str(training.final)
    return report


def format_table(reports: list[dict]) -> str:
    trained = sorted((r for r in reports if "trained" in r), key=lambda r: r["trained"]["match"] - r["words"]["match"])
    lines = ["| pair | words | trained | trained: shape / colour right | norm × median |", "|---|---|---|---|---|"]
    for r in trained:
        attributes = r["trained"]["per_attribute"]
        lines.append(f"| {r['colour']} {r['shape']} | {r['words']['match']:.0%} | {r['trained']['match']:.0%} "
                     f"| {attributes['shape']:.0%} / {attributes['colour']:.0%} | {r['norm_ratio']:.1f} |")
    below = [r for r in trained if r["trained"]["match"] < concepts.PASS]
    lines.append(f"{len(trained)} of {len(reports)} pairs drawn from words; {len(below)} trained below "
                 f"{concepts.PASS:.0%}: {', '.join(r['colour'] + ' ' + r['shape'] for r in below) or 'none'}")
    return "\n".join(lines)


def parse_pair(text: str) -> tuple[str, str]:
    shape, _, colour = text.partition(":")
    if shape not in world.SHAPES or colour not in world.COLOURS:
        raise argparse.ArgumentTypeError(f"{text!r} is not SHAPE:COLOUR of the toy world")
    return shape, colour


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=quality.DEFAULT_MODEL_DIR, help="toy model folder (with judge/)")
    parser.add_argument("--pairs", nargs="+", type=parse_pair, help="only these SHAPE:COLOUR pairs (default: every one)")
    parser.add_argument("--num_seeds", type=int, default=8, help="images per measurement (a cheap first pass)")
    parser.add_argument("--train_flags", default="", help="extra training flags (they win over the recipe's)")
    parser.add_argument("--captions", action="store_true",
                        help="caption each image with its background (train with --template_file subject_filewords)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work_dir", type=Path, default=Path("output/object_scan"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    pairs = args.pairs or list(itertools.product(world.SHAPES, world.COLOURS))
    options = {"model": args.model.resolve(), "num_seeds": args.num_seeds, "work_dir": args.work_dir.resolve(),
               "sampling": {"steps": quality.DEFAULT_STEPS, "guidance_scale": quality.DEFAULT_GUIDANCE},
               "train_flags": shlex.split(args.train_flags), "captions": args.captions, "save_every": 1000, "threads": 1 if args.workers > 1 else 2}
    started = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            reports = list(pool.map(measure_pair, pairs, [options] * len(pairs)))
    else:
        reports = [measure_pair(pair, options) for pair in pairs]
    print(format_table(reports))
    print(f"({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seeds": args.num_seeds, "train_flags": args.train_flags, "pairs": reports},
                                        indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
