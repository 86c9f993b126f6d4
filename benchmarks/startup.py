"""Start-up before the first step: loading a base model and hashing it, after or during the load.

Every file tinv writes records the model's A1111 hash (sha256 of the whole checkpoint), and the
latent cache is keyed by it. For a 4 GB checkpoint the hash reads 4 GB: done after loading (as
before) it adds its whole time to the start-up; `tinv_lib.models.loading` now runs it on a thread
while the model loads. Later runs find it in the hash cache (by path, size and mtime).

Each measurement is a fresh process with an empty hash cache (cold), or with the cache the
previous process left (cached); the file is read once first, so the page cache is warm for
every measurement and the comparison is of CPU work, not of the disk. Modes alternate.

    python benchmarks/startup.py output/sd15/sd15-random.safetensors --model_config output/sd15/model-sd15-512-seed0
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

    _setup.prepare_script()


def child(mode: str, model: str, model_config: str | None) -> None:
    """One measurement, printed as JSON: seconds to a loaded model and its hash."""
    import tinv_lib.models.loading as loading

    if mode == "after":  # no thread: the hash is computed when first asked for, after loading (the old order)
        original = loading.load_base_model

        def load_then_hash(*args, **kwargs):
            pipe, info = original(*args, **kwargs)
            info.hashing = None
            return pipe, info

        loading.BackgroundHash = type("Deferred", (), {"__init__": lambda self, path: None})
        loading.load_base_model = load_then_hash
    started = time.perf_counter()
    _, info = loading.load_base_model(model, model_config)
    loaded = time.perf_counter() - started
    assert len(info.short_hash) == 10
    print(json.dumps({"load_s": loaded, "total_s": time.perf_counter() - started}))


def measure(mode: str, args, cache: str) -> dict:
    env = {**os.environ, "TINV_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--child", mode, args.model]
    if args.model_config:
        command += ["--model_config", args.model_config]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--model_config")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["after", "during"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.model_config)
        return 0
    for path in [Path(args.model)] if Path(args.model).is_file() else Path(args.model).rglob("*.safetensors"):
        with open(path, "rb") as handle:  # warm the page cache
            while handle.read(1 << 24):
                pass
    results: dict[str, list[float]] = {"after, cold": [], "during, cold": [], "cached": []}
    for _ in range(args.repeats):
        for mode in ("after", "during"):
            with tempfile.TemporaryDirectory() as cache:
                results[f"{mode}, cold"].append(measure(mode, args, cache)["total_s"])
                if mode == "during":
                    results["cached"].append(measure(mode, args, cache)["total_s"])
    base = statistics.median(results["after, cold"])
    print(f"model: {args.model} ({sum(p.stat().st_size for p in ([Path(args.model)] if Path(args.model).is_file() else Path(args.model).rglob('*.safetensors'))) / 1e9:.2f} GB)")
    print("| hash | load + hash, s (median) | runs | vs hashing after |")
    print("|---|---|---|---|")
    for label, values in results.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {label} | {statistics.median(values):.1f} | {runs} | {statistics.median(values) / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
