"""The four top-level scripts are thin and run as a user runs them: `python SCRIPT --help`
prints their flags and exits 0, from any working directory."""

from __future__ import annotations

import pytest
from helpers import run_script

SCRIPTS = {
    "train_textual_inversion.py": "--placeholder_token",
    "train_hypernetwork.py": "--layer_structure",
    "preprocess.py": "--caption_model",
    "generate.py": "--from_infotext",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_help(script, tmp_path):
    done = run_script(script, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and SCRIPTS[script] in done.stdout
