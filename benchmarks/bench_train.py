"""Training-step benchmark against the physical floor (issue 9).

Speed is what cloud users pay for, so a textual-inversion (TI) step should cost what its maths
costs and nothing more. This script measures, in one run, on the same model, data, batch size,
precision and device:

* the **TI floor**: a bare loop doing only the unavoidable work of one TI step: cached latents,
  noise, text-encoder forward with the trainable vectors written into the token-embedding
  output, UNet forward, backward to the vectors (no weight gradients anywhere), AdamW step on
  the vectors. Prompts are tokenized once up front.
* **our TI step**: `train_textual_inversion`'s real training core (`tinv_lib.training.loop.train`,
  data loading, A1111 prompt encoding, logging and all), timed through its `on_step` callback.
* the **hypernetwork (HN) floor**: the same bare loop with the text encodings cached (the text
  encoder is frozen) and the hypernetwork's (k, v) modules put directly in front of every
  attention layer's `to_k` / `to_v`; backward reaches only the hypernetwork weights.
* **our HN step**: `train_hypernetwork`'s real training core.

For each it reports steps/s, the ratio to its floor, peak memory (RSS on the CPU; allocated and
reserved on a GPU) and the bytes of optimizer state and gradients, which must be
O(num_vectors x width), not O(vocabulary x width).

How: our trainer runs with an `on_step` callback that runs one floor step inside each call, so
the two alternate step by step and a machine shared with other jobs slows both alike; each
round is one whole training run, and the figures are medians over rounds. Each (variant, task)
has its own worker process; variants take turns round by round. Afterwards every step kind runs
once more by itself in a fresh process for its peak memory. docs/benchmarks.md has the results.

    python benchmarks/bench_train.py --preset bench --threads 1
    python benchmarks/bench_train.py --preset bench --threads 1 --sweep     # effect of each option
    python benchmarks/bench_train.py --preset sd15 --resolution 512 --mixed_precision bf16 \\
        --variants=default,+gc,+gc+8bit,+gc+8bit+compile                     # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402 - after the environment the hub libraries read

from benchmarks.bench.jobs import FLOOR_OF, Job  # noqa: E402
from benchmarks.bench.presets import PRESETS, prepare_images, prepare_model  # noqa: E402
from benchmarks.bench.report import (  # noqa: E402
    acceptance_lines,
    byte_lines,
    format_table,
    machine_description,
    prompt_cache_lines,
)
from benchmarks.bench.variants import Options, parse_variant, sweep_variants  # noqa: E402
from benchmarks.bench.workers import measure  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Training-step benchmark against the physical floor.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="bench")
    parser.add_argument("--resolution", type=int, help="image size (default: the preset's)")
    parser.add_argument("--batch", type=int, help="images per step (default: the preset's)")
    parser.add_argument("--num_vectors", type=int, default=4, help="TI vectors per text encoder")
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, per round (at least 1)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the figures are medians over rounds")
    parser.add_argument("--tasks", default="ti,hn", help="ti, hn or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's choice)")
    opt = parser.add_argument_group("options (the base variant; default: the trainers' defaults)")
    opt.add_argument("--no_latent_cache", action="store_true", help="floor VAE-encodes every step (trainers always cache)")
    opt.add_argument("--gradient_checkpointing", action="store_true")
    opt.add_argument("--no_sdpa", action="store_true", help="plain AttnProcessor instead of torch SDPA")
    opt.add_argument("--channels_last", action="store_true", help="UNet in channels_last memory format")
    opt.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    opt.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--variants", default="default",
                        help="comma-separated variants on top of the base (write --variants=... when the first "
                             "starts with '-'): default, +gradient_checkpointing (+gc), -sdpa, +8bit, +compile, "
                             "+channels_last, -latent_cache, bf16, fp16, or combinations like +gc+8bit")
    parser.add_argument("--sweep", action="store_true", help="the base, then each option flipped by itself")
    parser.add_argument("--no_memory", action="store_true", help="skip the runs by itself (peak memory, bytes)")
    parser.add_argument("--workdir", help="keep the built model and images here (reused by later runs)")
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--inline", action="store_true", help="no worker processes (smoke tests; memory mixed)")
    return parser


def base_options(args: argparse.Namespace) -> Options:
    return Options(latent_cache=not args.no_latent_cache, gradient_checkpointing=args.gradient_checkpointing,
                   sdpa=not args.no_sdpa, channels_last=args.channels_last, compile=args.compile,
                   use_8bit_adam=args.use_8bit_adam, mixed_precision=args.mixed_precision)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--warmup, --steps and --repeats must be at least 1")
    base = base_options(args)
    variants = sweep_variants(base) if args.sweep else [parse_variant(v.strip(), base) for v in args.variants.split(",") if v.strip()]
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks or set(tasks) - set(FLOOR_OF):
        raise SystemExit("--tasks: ti, hn or ti,hn")
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        return run(args, variants, tasks, workdir, "python benchmarks/bench_train.py " + " ".join(argv))


def run(args: argparse.Namespace, variants: list[Options], tasks: list[str], workdir: Path, command: str) -> int:
    """Build the model and images, measure, print the table and the checks."""
    preset = PRESETS[args.preset]
    preset = replace(preset, resolution=args.resolution or preset.resolution, batch=args.batch or preset.batch)
    started = time.perf_counter()
    model = prepare_model(preset, args.seed, workdir)
    data = prepare_images(workdir / f"images-{preset.resolution}", max(args.images, preset.batch), preset.resolution)
    jobs = [Job("pair", task, options, str(model), str(data), preset, preset.batch, preset.resolution,
                args.num_vectors, args.warmup, args.steps, args.seed, str(workdir), args.threads)
            for options in variants for task in tasks]
    print(f"preset {preset.name} ({preset.about}); {preset.resolution} px, batch {preset.batch}, "
          f"{args.num_vectors} TI vectors; {args.repeats} rounds of {args.warmup}+{args.steps} steps; "
          f"{args.threads or torch.get_num_threads()} torch threads", flush=True)
    rows = measure(jobs, args.repeats, args.inline, not args.no_memory, lambda line: print(line, flush=True))
    summaries = [line for row in rows for line in row.summaries(next(r for r in rows if r.task == row.task))]
    machine = machine_description()
    print(f"\nmachine: {machine}\ncommand: {command}\nwall time: {time.perf_counter() - started:.0f} s\n")
    print(format_table(summaries, torch.cuda.is_available()))
    print()
    checks = acceptance_lines(summaries, {"ti": 1.15, "hn": 1.2})
    for line in byte_lines(summaries, preset, args.num_vectors) + prompt_cache_lines(summaries) + checks:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": asdict(preset), "machine": machine, "command": command,
                                               "results": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
