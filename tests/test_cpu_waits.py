"""The scripts make OpenMP's idle threads sleep on CPU runs, before torch loads, unless told otherwise.

Beside a second torch process on the same cores, spinning OpenMP threads made the toy quickstart
about 20 times slower (`benchmarks/shared_cpu.py`, docs/benchmarks.md); OpenMP reads its wait
policy once, when torch loads, so the script must set it before anything imports torch.
"""

from __future__ import annotations

import os

import pytest
from helpers import ROOT, variable_when_torch_loads

SCRIPTS = ("train_textual_inversion.py", "train_hypernetwork.py", "generate.py", "preprocess.py")


def _policy_when_torch_loads(script: str, **environment: str) -> str | None:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env.update(environment, CUDA_VISIBLE_DEVICES="")
    return variable_when_torch_loads(ROOT / script, "OMP_WAIT_POLICY", env)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cpu_run_waits_passively(script):
    assert _policy_when_torch_loads(script) == "PASSIVE"


def test_the_users_own_policy_is_kept():
    assert _policy_when_torch_loads("train_textual_inversion.py", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
