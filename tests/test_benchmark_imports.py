"""Benchmark and recipe modules import without side effects: tests import them, so an import
that changed `os.environ` or `sys.path` would change every test that runs after it. Set-up
happens only when they run as scripts (`benchmarks/_setup.py`), and they still start so."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
from helpers import ROOT, variable_when_torch_loads

SCRIPT_FOLDERS = ("benchmarks", "recipes")
# Unset while a module is imported, so that a `setdefault` of one shows even where the test run
# (conftest.py) has already set it.
SCRIPT_VARIABLES = ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM")


def _modules() -> list[str]:
    """Every Python module under the script folders, as `benchmarks.bench.floor` and so on."""
    return sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                  for folder in SCRIPT_FOLDERS for path in (ROOT / folder).rglob("*.py")
                  if path.name != "__init__.py")


def _import_fresh(name: str) -> None:
    """Import `name` as if for the first time (with the packages it is in)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        sys.modules.pop(".".join(parts[:end]), None)
    importlib.import_module(name)


@pytest.mark.parametrize("name", _modules())
def test_importing_changes_neither_environment_nor_sys_path(name):
    """The module's own code, that is: the libraries it imports are imported once first (some set
    variables of their own when first imported), then everything is put back and it is imported
    afresh."""
    environment, path = dict(os.environ), list(sys.path)
    before = {key: value for key, value in environment.items() if key not in SCRIPT_VARIABLES}
    try:
        importlib.import_module(name)
        os.environ.clear()
        os.environ.update(before)
        sys.path[:] = path
        _import_fresh(name)
        assert dict(os.environ) == before, f"importing {name} changed the environment"
        assert sys.path == path, f"importing {name} changed sys.path"
    finally:
        os.environ.clear()
        os.environ.update(environment)
        sys.path[:] = path


def test_the_scan_sees_every_script():
    assert {"benchmarks.bench_train", "benchmarks.concepts", "benchmarks.quality", "benchmarks.styles",
            "benchmarks.startup", "recipes.pretrain_toy_model"} <= set(_modules())


@pytest.mark.parametrize(("script", "variable", "value"), [
    ("quality.py", "OMP_WAIT_POLICY", "PASSIVE"), ("concepts.py", "TQDM_DISABLE", "1"),
    ("styles.py", "OMP_WAIT_POLICY", "PASSIVE"), ("bench_train.py", "TOKENIZERS_PARALLELISM", "false"),
])
def test_a_benchmark_run_as_a_script_sets_up_before_torch_loads(script, variable, value):
    """From outside the checkout, without PYTHONPATH: the script finds the checkout's packages
    and has set its environment before torch is imported."""
    environment = {key: val for key, val in os.environ.items() if key not in (variable, "PYTHONPATH")}
    assert variable_when_torch_loads(ROOT / "benchmarks" / script, variable, environment, cwd="/") == value
