"""OpenMP's wait policy on CPU runs: idle threads sleep instead of spinning.

When a torch thread finishes its share of a parallel region, OpenMP (libgomp) by default keeps it
spinning for a while, waiting for the next region. Alone on the machine that costs little; beside
a second torch process on the same cores (a training beside the test suite, two jobs on a small
cloud node) the spinning threads take the cores from the threads that have work. Measured on 2
cores with the toy quickstart beside a second copy of itself (`benchmarks/shared_cpu.py`,
docs/benchmarks.md): 0.49 steps/s with the default policy, 10.7 with `OMP_WAIT_POLICY=PASSIVE`.

OpenMP reads the variable once, when torch loads it, so the scripts call `prefer_passive_waits`
before anything imports torch. A value the user set is never replaced, and a run that will use an
NVIDIA GPU is left alone (its CPU threads do little parallel work).
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = ("1", "true", "yes")


def _will_use_nvidia_gpu() -> bool:
    """Whether this process will see a CUDA device, judged without importing torch."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def prefer_passive_waits() -> None:
    """Set `OMP_WAIT_POLICY=PASSIVE` for a CPU run unless the user chose a policy."""
    if not _will_use_nvidia_gpu():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
