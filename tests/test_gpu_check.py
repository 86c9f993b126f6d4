"""`benchmarks/gpu_check.sh`: refuses in one line without CUDA, and its CPU rehearsal runs every
stage (benchmark tables, fp16/grad-scaler run, NaN guard) at toy size."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import ROOT

SCRIPT = str(ROOT / "benchmarks" / "gpu_check.sh")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_refuses_in_one_line_without_cuda():
    done = subprocess.run(["bash", SCRIPT], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU here" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_dry_run_passes_every_stage(tmp_path):
    done = subprocess.run(["bash", SCRIPT, "--dry_run"], env={**ENV, "GPU_CHECK_WORKDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| default | TI ours |" in done.stdout and "| +gradient_checkpointing | HN ours |" in done.stdout
    assert (tmp_path / "fp16" / "checkpoint-20" / "state.json").is_file()
    assert "error: loss became" in (tmp_path / "nan.err").read_text()
    assert done.stdout.rstrip().endswith("gpu_check.sh: all stages passed")
