"""The four top-level scripts are thin and run as a user runs them: `python SCRIPT --help`
prints their flags and exits 0, from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = {
    "train_textual_inversion.py": "--placeholder_token",
    "train_hypernetwork.py": "--layer_structure",
    "preprocess.py": "--caption_model",
    "generate.py": "--from_infotext",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_help(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and SCRIPTS[script] in done.stdout
