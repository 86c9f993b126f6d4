"""What a benchmark script sets up when it runs as a script, and never when it is imported.

Tests import the benchmark modules, so importing one must leave `sys.path` and `os.environ` as
they were. Each script calls `prepare_script` under `if __name__ == "__main__":` before it
imports torch: OpenMP reads `OMP_WAIT_POLICY` when torch loads it, and huggingface_hub and tqdm
read `HF_HUB_OFFLINE` and `TQDM_DISABLE` when they are imported, so a `main()` would be too late.

Run as `python benchmarks/x.py`, Python puts `benchmarks/` first on `sys.path`, which is how a
script finds this module (`import _setup`); `prepare_script` then puts the checkout there too,
so `tinv_lib`, `toy_world`, `testing` and `benchmarks` import as they do under pytest
(`pythonpath = ["."]`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare_script(**environment: str) -> None:
    """The checkout first on `sys.path`, and `environment` set wherever the user has not set it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for key, value in environment.items():
        os.environ.setdefault(key, value)
