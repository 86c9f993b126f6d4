"""Training from a folder, a saved dataset and a stream: set-up time, steps/s and peak memory.

A folder and a dataset read whole keep every image (pixels and cached latents) in memory, so
their memory and set-up grow with the set; a stream (`--streaming`) reads and encodes each
step's images, so its memory stays flat however large the set, at the price of encoding every
step. Each row is a fresh process training textual inversion on a tiny SD 1.x model at 64 px
(batch 1, the same steps), timed from its first step to its last; peak RSS is the process's.

    OMP_NUM_THREADS=1 python benchmarks/bench_datasets.py --images 1000 --stream_images 10000 --steps 40

Prints one markdown table; the ratios are against the folder row of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # as a script (the parent and each child): import the checkout's tinv_lib
    import _setup

    _setup.prepare_script(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")


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


def child(config: dict) -> None:
    """One training run; prints JSON: set-up seconds, steps/s over the steps after the first, peak RSS."""
    from tinv_lib.training.loop import train
    from tinv_lib.training.runner import prepare_process
    from tinv_lib.training.task import TrainingHooks
    from tinv_lib.training.textual_inversion import TextualInversionTask, parse_args

    args = parse_args(config["argv"])
    started = time.perf_counter()
    stamps: list[float] = []
    prepare_process()
    code = train(args, TextualInversionTask(args), TrainingHooks(on_step=lambda step: stamps.append(time.perf_counter())))
    assert code == 0
    steps = len(stamps) - 1
    print(json.dumps({"setup_s": stamps[0] - started, "steps_per_s": steps / (stamps[-1] - stamps[0]),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(model: Path, source: list[str], out: Path, steps: int) -> dict:
    argv = ["--pretrained_model_name_or_path", str(model), *source, "--output_dir", str(out), "--placeholder_token",
            "tok", "--initializer_token", "noise", "--resolution", "64", "--max_train_steps", str(steps),
            "--report_to", "none", "--validation_steps", "0", "--save_steps", "0", "--checkpointing_steps", "0",
            "--template_file", "subject_filewords", "--aspect_mode", "crop"]
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps({"argv": argv})], capture_output=True,
                          text=True, env=os.environ)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the folder and the saved dataset")
    parser.add_argument("--stream_images", type=int, default=10000, help="images in the larger stream")
    parser.add_argument("--steps", type=int, default=40)
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
        results = [(name, count, measure(model, source, root / f"out-{index}", args.steps))
                   for index, (name, count, source) in enumerate(rows)]
    base = results[0][2]
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.steps} steps, batch 1, 64 px, tiny SD 1.x")
    print("| source | images | set-up s | steps/s | x folder | peak RSS MB | x folder |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, count, r in results:
        print(f"| {name} | {count:,} | {r['setup_s']:.1f} | {r['steps_per_s']:.1f} | "
              f"{r['steps_per_s'] / base['steps_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
