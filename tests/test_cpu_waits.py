"""The scripts make OpenMP's idle threads sleep on CPU runs, before torch loads, unless told otherwise.

Beside a second torch process on the same cores, spinning OpenMP threads made the toy quickstart
about 20 times slower (`benchmarks/shared_cpu.py`, docs/benchmarks.md); OpenMP reads its wait
policy once, when torch loads, so the script must set it before anything imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

# Runs a script with `--help` and records OMP_WAIT_POLICY at the moment torch is first imported
# (or at the end, for the scripts whose --help never loads torch).
_RUN_AS_SCRIPT = """
import os, runpy, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Spy())
sys.path[0] = os.path.dirname(SCRIPT)
sys.argv = [SCRIPT, "--help"]
try:
    runpy.run_path(SCRIPT, run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print(seen or [os.environ.get("OMP_WAIT_POLICY")])  # no torch for --help: what it would find
"""

SCRIPTS = ("train_textual_inversion.py", "train_hypernetwork.py", "generate.py", "preprocess.py")


def _policy_when_torch_loads(script: str, **environment: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env.update(environment, CUDA_VISIBLE_DEVICES="")
    code = f"SCRIPT = {str(ROOT / script)!r}" + _RUN_AS_SCRIPT
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cpu_run_waits_passively(script):
    assert _policy_when_torch_loads(script) == repr(["PASSIVE"])


def test_the_users_own_policy_is_kept():
    assert _policy_when_torch_loads("train_textual_inversion.py", OMP_WAIT_POLICY="ACTIVE") == repr(["ACTIVE"])
