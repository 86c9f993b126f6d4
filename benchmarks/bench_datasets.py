"""Training from a folder, a saved dataset and a stream: set-up time, steps/s and peak memory.

A folder and a dataset read whole keep every image (pixels and cached latents) in memory, so
their memory and set-up grow with the set; a stream (`--streaming`) reads and encodes each
step's images, so its memory stays flat however large the set, at the price of encoding every
step. Each row is a fresh process training textual inversion on a tiny SD 1.x model at 64 px
(batch 1, the same steps), timed from its first step to its last; peak RSS is the process's.

    OMP_NUM_THREADS=1 python benchmarks/bench_datasets.py --images 1000 --stream_images 10000 --steps 40

Prints one markdown table (the ratios against the folder row of the same run), then a long
streamed run that reads thousands of rows: its RSS after every tenth of them, split into the
process's own memory and mapped file pages (a `save_to_disk` set is a memory-mapped arrow file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # as a script (the parent and each child): import the checkout's tinv_lib
    import _setup

    _setup.prepare_script(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def write_set(root: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """`count` 64x64 noise PNGs with captions, as a folder and as a `save_to_disk` dataset."""
    import datasets
    import numpy as np
    from PIL import Image

    folder, saved = root / f"folder-{count}", root / f"saved-{count}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")
        (folder / f"{index:06d}.txt").write_text(f"noise {index % 10}", encoding="utf-8")

    def rows():
        for index in range(count):
            yield {"image": {"bytes": (folder / f"{index:06d}.png").read_bytes(), "path": None},
                   "text": f"noise {index % 10}"}

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(root / "hf-cache"))
    dataset.save_to_disk(str(saved))
    return folder, saved


def _rss_mb(field: str) -> float:
    """A memory figure of this process in MB from /proc: `VmRSS` (resident now), `VmHWM` (its
    peak; unlike `ru_maxrss` not inherited from the parent across exec), `RssAnon` (the process's
    own memory) or `RssFile` (mapped file pages, such as a memory-mapped arrow file's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(config: dict) -> None:
    """One training run; prints JSON: set-up seconds, steps/s over the steps after the first, peak
    RSS, and RSS (total, own, mapped files) after every tenth of the steps."""
    from tinv_lib.training.loop import train
    from tinv_lib.training.runner import prepare_process
    from tinv_lib.training.task import TrainingHooks
    from tinv_lib.training.textual_inversion import TextualInversionTask, parse_args

    args = parse_args(config["argv"])
    started = time.perf_counter()
    stamps: list[float] = []
    rss: dict[int, float] = {}

    def on_step(report) -> None:
        stamps.append(time.perf_counter())
        if report.step % max(1, args.max_train_steps // 10) == 0:
            rss[report.step] = [_rss_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")]

    prepare_process()
    assert train(args, TextualInversionTask(args), TrainingHooks(on_step=on_step)) == 0
    steps = len(stamps) - 1
    print(json.dumps({"setup_s": stamps[0] - started, "steps_per_s": steps / (stamps[-1] - stamps[0]),
                      "peak_rss_mb": _rss_mb("VmHWM"), "rss_mb": [rss[key] for key in sorted(rss)]}))


def measure(model: Path, source: list[str], out: Path, steps: int, batch: int) -> dict:
    argv = ["--pretrained_model_name_or_path", str(model), *source, "--output_dir", str(out), "--placeholder_token",
            "tok", "--initializer_token", "noise", "--resolution", "64", "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), "--report_to", "none", "--validation_steps", "0", "--save_steps", "0",
            "--checkpointing_steps", "0", "--template_file", "subject_filewords", "--aspect_mode", "crop"]
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps({"argv": argv})], capture_output=True,
                          text=True, env=os.environ)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the folder and the saved dataset")
    parser.add_argument("--stream_images", type=int, default=10000, help="images in the larger stream")
    parser.add_argument("--steps", type=int, default=40, help="steps (batch 1) of each table row")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each table row (medians)")
    parser.add_argument("--long_rows", type=int, default=2400, help="rows the long stream run reads")
    parser.add_argument("--long_batch", type=int, default=8, help="batch of the long stream run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    from testing.tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as work:
        root = Path(work)
        model = save_tiny_pipeline("sd1", root / "model")
        folder, saved = write_set(root, args.images)
        _, big = write_set(root, args.stream_images, seed=1)
        rows = [("folder", args.images, ["--train_data_dir", str(folder)]),
                ("saved dataset", args.images, ["--dataset_name", str(saved)]),
                ("stream", args.images, ["--dataset_name", str(saved), "--streaming"]),
                ("stream", args.stream_images, ["--dataset_name", str(big), "--streaming"])]
        runs: list[list[dict]] = [[] for _ in rows]
        for repeat in range(args.repeats):  # interleaved, so a change in the machine's load hits every row alike
            for index, (_, _, source) in enumerate(rows):
                runs[index].append(measure(model, source, root / f"out-{index}-{repeat}", args.steps, 1))
        long_steps = args.long_rows // args.long_batch
        long = measure(model, ["--dataset_name", str(big), "--streaming"], root / "out-long", long_steps,
                       args.long_batch)
    base = runs[0]
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.steps} steps at batch 1, 64 px, "
          f"tiny SD 1.x; medians of {args.repeats} interleaved runs")
    print("| source | images | set-up s | steps/s | x folder | peak RSS MB | x folder |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, count, _), results in zip(rows, runs):
        speed, peak = _median(results, "steps_per_s"), _median(results, "peak_rss_mb")
        print(f"| {name} | {count:,} | {_median(results, 'setup_s'):.1f} | {speed:.1f} | "
              f"{speed / _median(base, 'steps_per_s'):.2f} | {peak:.0f} | {peak / _median(base, 'peak_rss_mb'):.2f} |")
    print(f"\nstream of {args.stream_images:,}, batch {args.long_batch}, {long_steps} steps ({args.long_rows:,} rows "
          f"read), {long['steps_per_s'] * args.long_batch:.1f} images/s; RSS MB every tenth of the rows:")
    print("| rows read | RSS | own (RssAnon) | mapped files (RssFile) |")
    print("|---:|---:|---:|---:|")
    for tenth, (total, anon, mapped) in enumerate(long["rss_mb"], start=1):
        print(f"| {tenth * args.long_rows // 10:,} | {total:.0f} | {anon:.0f} | {mapped:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
