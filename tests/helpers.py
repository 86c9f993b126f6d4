"""Plain helpers shared by several test files: training command lines, the frozen weights of a
pipeline, running a top-level script.

Fixtures live in `conftest.py`; plain functions live in `helpers*.py` modules beside the tests
(`helpers_embeddings.py` for embedding files) and are imported by name, e.g.
`from helpers import train_argv`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Flags that switch a run's extras off, by the name `train_argv(off=...)` uses for them.
OFF_FLAGS = {
    "report": ("--report_to", "none"),
    "validation": ("--validation_steps", "0"),
    "save": ("--save_steps", "0"),
    "checkpointing": ("--checkpointing_steps", "0"),
}
QUIET = tuple(OFF_FLAGS)  # a run that only trains and writes its final file


def train_argv(model: Path, data: Path, out: Path, *extra: str, name: str = "my-thing",
               initializer: str | None = "cat", hypernetwork: bool = False,
               off: tuple[str, ...] = QUIET) -> list[str]:
    """The command line of a tiny training run at 64 px.

    Textual inversion of `name` started from `initializer` (None: the trainer's default), or with
    `hypernetwork` a hypernetwork called `name`; the extras named in `off` (see OFF_FLAGS) are
    switched off; `extra` comes last, so it can switch any of them back on.
    """
    if hypernetwork:
        who = ["--hypernetwork_name", name]
    else:
        who = ["--placeholder_token", name, *(["--initializer_token", initializer] if initializer is not None else [])]
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            *who, "--resolution", "64", *(flag for feature in off for flag in OFF_FLAGS[feature]), *extra]


def frozen_state(pipe) -> dict[str, torch.Tensor]:
    """A copy of every weight of the UNet, VAE and text encoder(s), keyed `unet.<key>`, `vae.<key>`,
    `te.<key>`, `te2.<key>`: what training must leave untouched."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "te": pipe.text_encoder, "te2": getattr(pipe, "text_encoder_2", None)}
    return {f"{name}.{key}": value.detach().clone() for name, module in modules.items() if module is not None
            for key, value in module.state_dict().items()}


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a top-level script (`preprocess.py`, ...) as a user does, offline, and capture its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_training(args, task, hooks=None) -> int:
    """`loop.train` as the scripts run it: after the process set-up their runner does first."""
    from tinv_lib.training.loop import train
    from tinv_lib.training.runner import prepare_process

    prepare_process()
    return train(args, task, hooks)


# Runs a script with `--help` and a spy on the first `import torch`: what a variable holds then
# (OpenMP reads OMP_WAIT_POLICY once, as torch loads), or at the end if `--help` never loads torch.
_SPY_ON_TORCH = """
import os, runpy, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get(VARIABLE))
sys.meta_path.insert(0, Spy())
sys.path[0] = os.path.dirname(SCRIPT)
sys.argv = [SCRIPT, "--help"]
try:
    runpy.run_path(SCRIPT, run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print(repr((seen or [os.environ.get(VARIABLE)])[0]))
"""


def variable_when_torch_loads(script: Path, variable: str, env: dict[str, str], cwd: Path | str = ROOT) -> str | None:
    """`variable` as `python <script> --help` has it when torch is first imported."""
    code = f"SCRIPT, VARIABLE = {str(script)!r}, {variable!r}" + _SPY_ON_TORCH
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.splitlines()[-1])  # the spy prints the repr of a str or None
