"""The toy quickstart on a CPU shared with a second torch process: OpenMP's wait policy and threads.

A training beside the test suite on 2 cores once ran 46 times slower than alone, far more than a
fair share explains. OpenMP threads that finish a parallel region spin while they wait for the
next one (libgomp's default), and when there are more busy threads than cores, spinning threads
take the cores from the threads that have work. `OMP_WAIT_POLICY=PASSIVE` makes them sleep.

Each case runs the quickstart's training (models/toy, examples/concept, batch 4) for `--steps`
steps in a fresh process, alone or beside a second copy of itself started at the same moment,
and reads the trainer's own progress bar: steps per second of training, model loading excluded.
Both copies get the same environment. Cases alternate, `--rounds` times; medians are printed.

    python benchmarks/shared_cpu.py --steps 150 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    import _setup

    _setup.prepare_script()

ROOT = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1
CASES = {  # name: (beside a second process, environment for both)
    "alone, default": (False, {}),  # default: libgomp's own policy (threads spin, then sleep)
    "alone, passive": (False, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "beside, default": (True, {}),
    "beside, passive": (True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    f"beside, passive, {max(1, CORES // 2)} thread(s) each": (
        True, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, CORES // 2))}),
}
FINAL_FRAME = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


# The trainer without its script: the script itself sets OMP_WAIT_POLICY=PASSIVE on CPU runs
# (tinv_lib/common/cpu_waits.py), and the "default" cases measure what happens without it.
TRAINER = "import sys; from tinv_lib.training.textual_inversion import main; sys.exit(main())"


def training_command(steps: int, output_dir: Path) -> list[str]:
    return [sys.executable, "-c", TRAINER,
            "--pretrained_model_name_or_path", str(ROOT / "models/toy"),
            "--train_data_dir", str(ROOT / "examples/concept"), "--placeholder_token", "toy-concept",
            "--initializer_token", "triangle", "--num_vectors", "4", "--resolution", "64",
            "--template_file", "subject", "--learning_rate", "0.005", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--report_to", "none", "--output_dir", str(output_dir)]


def steps_per_second(log: str) -> float | None:
    """The last progress-bar frame: steps done over the bar's own elapsed time (None before 10 s).

    A run stopped at the time-out still gives its rate so far, so a pathological case is a
    number, not an hour."""
    frames = list(FINAL_FRAME.finditer(log))
    if not frames:
        return None
    done = int(frames[-1].group(1))
    hours, minutes, seconds = (int(g or 0) for g in frames[-1].groups()[2:])
    elapsed = hours * 3600 + minutes * 60 + seconds
    return done / elapsed if elapsed >= 10 else None


def run_case(beside: bool, extra_env: dict[str, str], steps: int, timeout: float) -> float | None:
    """Steps/s of the measured process, over at most `timeout` seconds."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(extra_env, HF_HUB_OFFLINE="1", TQDM_MININTERVAL="0")
    with tempfile.TemporaryDirectory() as work:
        processes = []
        for copy in range(2 if beside else 1):
            log = open(Path(work) / f"log{copy}", "w")
            processes.append((subprocess.Popen(training_command(steps, Path(work) / f"out{copy}"), env=env,
                                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        try:
            processes[0][0].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        for process, log in processes:
            process.kill()
            process.wait()
            log.close()
        return steps_per_second((Path(work) / "log0").read_text(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a case counts as not finished")
    args = parser.parse_args(argv)
    rates: dict[str, list[float | None]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, (beside, env) in CASES.items():
            rates[name].append(run_case(beside, env, args.steps, args.timeout))
            print(f"  {name}: {rates[name][-1]}", flush=True)
    base = statistics.median(r or 0.0 for r in rates["alone, default"])
    print(f"\n{CORES} cores, {args.steps} steps, {args.rounds} rounds (median steps/s; x alone-default)")
    for name, values in rates.items():
        if None in values:
            print(f"| {name} | no rate (under 10 s of training) |")
            continue
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} steps/s | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
