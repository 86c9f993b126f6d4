"""No lost work: flags are checked before the model loads, a failing preview only turns previews
off, and any other failure inside the loop saves the training before the run ends."""

import re
from pathlib import Path

import pytest
from helpers import train_argv

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.hypernetworks import load_hypernetwork
from tinv_lib.training import hypernetwork as hypernetwork_training
from tinv_lib.training import textual_inversion
from tinv_lib.training.checkpoints import list_checkpoints, load_checkpoint


def _hn_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(model, data, out, *extra, name="hn", hypernetwork=True)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base model is loaded: these errors must come first."""
    import tinv_lib.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(tinv_lib.models.loading, "load_base_model", refuse)


BAD_FLAGS = [
    (("--resolution", "63"), "--resolution 63 must be a multiple of 8"),
    (("--max_train_steps", "0"), "--max_train_steps must be a positive integer"),
    (("--validation_num_inference_steps", "0"), "--validation_num_inference_steps must be a positive integer"),
    (("--lr_warmup_steps", "-1"), "--lr_warmup_steps must be 0 (off) or a positive integer"),
    (("--flip_p", "1.5"), "--flip_p must be in [0, 1]"),
    (("--tag_dropout", "1"), "--tag_dropout must be in [0, 1)"),
    (("--num_vectors", "0"), "--num_vectors must be 1-75"),
    (("--template_file", "no-such-template"), "template 'no-such-template' not found"),
    (("--resume_from_embedding", "missing.pt"), "--resume_from_embedding missing.pt: no such file"),
    (("--resume_from_checkpoint", "checkpoint-9"), "--resume_from_checkpoint checkpoint-9: not a checkpoint folder"),
    (("--learning_rate", "fast"), "Invalid learning rate schedule"),
    (("--max_grad_norm", "big"), "--max_grad_norm 'big'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[flags[0] for flags, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_before_the_model_loads(flags, message, tiny_sd1_path, training_images, tmp_path,
                                                              capsys, no_model_load):
    out = tmp_path / "out"
    assert textual_inversion.main(train_argv(tiny_sd1_path, training_images, out, *flags)) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], printed.err
    assert printed.out == "" and not out.exists()


def test_missing_files_and_bad_hypernetwork_options_fail_before_the_model_loads(tiny_sd1_path, training_images, tmp_path,
                                                                                capsys, no_model_load):
    cases = [
        (train_argv(tmp_path / "no-model", training_images, tmp_path / "out"), "--pretrained_model_name_or_path"),
        (train_argv(tiny_sd1_path, tmp_path / "no-data", tmp_path / "out"), "--train_data_dir"),
        (_hn_argv(tiny_sd1_path, training_images, tmp_path / "out", "--dropout_structure", "0, 1.5, 0"),
         "dropout structure"),
        (_hn_argv(tiny_sd1_path, training_images, tmp_path / "out", "--resume_from_hypernetwork", "gone.pt"),
         "--resume_from_hypernetwork gone.pt: no such file"),
    ]
    for argv, message in cases:
        main = hypernetwork_training.main if "--hypernetwork_name" in argv else textual_inversion.main
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_a_failing_preview_is_one_notice_and_training_goes_on(tiny_sd1_path, training_images, tmp_path, capsys,
                                                              monkeypatch):
    calls = []

    def broken_preview(self, *args, **kwargs):
        calls.append(args)
        raise ValueError("`height` and `width` have to be divisible by 8 but are 63 and 63.\nmore detail")

    monkeypatch.setattr(textual_inversion.TextualInversionTask, "preview", broken_preview)
    code = textual_inversion.main(train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "4",
                                        "--validation_steps", "1", "--checkpointing_steps", "4"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(calls) == 1, "previews went on after one failed"
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert notices == ["notice: the preview at step 1 failed (ValueError: `height` and `width` have to be divisible "
                       "by 8 but are 63 and 63.); previews are off for the rest of this run, training goes on"]
    assert load_embedding(tmp_path / "my-thing.pt").step == 4
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def _fail_on_call(monkeypatch, cls, number: int) -> None:
    """Make `cls.conditioning` (the forward pass of a step) raise on its `number`-th call."""
    original = cls.conditioning
    count = [0]

    def conditioning(self, prompts):
        count[0] += 1
        if count[0] == number:
            raise RuntimeError("injected failure\nsecond line of the message")
        return original(self, prompts)

    monkeypatch.setattr(cls, "conditioning", conditioning)


def test_a_failure_inside_a_step_saves_the_embedding_and_a_checkpoint(tiny_sd1_path, training_images, tmp_path,
                                                                      capsys, monkeypatch):
    _fail_on_call(monkeypatch, textual_inversion.TextualInversionTask, 4)  # steps 1-3 finish, step 4 breaks
    argv = train_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "6")
    code = textual_inversion.main(argv)
    printed = capsys.readouterr()
    assert code == 1, printed.err
    assert "Traceback" not in printed.err
    logs = list(tmp_path.glob("crash-*.log"))
    assert len(logs) == 1
    error = printed.err.strip().splitlines()[-1]
    assert error == (f"error: training failed after step 3 (RuntimeError: injected failure); saved "
                     f"{tmp_path / 'my-thing.pt'}, {tmp_path / 'my-thing.safetensors'}, {tmp_path / 'checkpoint-3'}; "
                     f"traceback in {logs[0]}")
    log = logs[0].read_text()
    assert "Traceback (most recent call last)" in log and "second line of the message" in log
    saved = load_embedding(tmp_path / "my-thing.pt")
    assert saved.step == 3 and load_embedding(tmp_path / "my-thing.safetensors").step == 3
    state = load_checkpoint(tmp_path / "checkpoint-3", "textual_inversion")
    assert state.step == 3
    monkeypatch.undo()
    assert textual_inversion.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert load_embedding(tmp_path / "my-thing.pt").step == 6


def test_a_failure_inside_a_hypernetwork_step_saves_it_too(tiny_sd1_path, training_images, tmp_path, capsys,
                                                           monkeypatch):
    _fail_on_call(monkeypatch, hypernetwork_training.HypernetworkTask, 3)
    code = hypernetwork_training.main(_hn_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: training failed after step 2 (RuntimeError: injected failure)")
    assert load_hypernetwork(tmp_path / "hn.pt").step == 2
    assert load_checkpoint(tmp_path / "checkpoint-2", "hypernetwork").step == 2


# ---------------------------------------------------------------- the crash path as a user sees it

# The training script with a failure injected into the forward pass of step 4 (the 4th call of
# `conditioning`) on the process whose RANK is FAIL_RANK; everything else is the real script.
_FAILING_SCRIPT = """
import os, sys
from tinv_lib.training import textual_inversion

original, calls = textual_inversion.TextualInversionTask.conditioning, [0]

def conditioning(self, prompts):
    calls[0] += 1
    if calls[0] == 4 and os.environ.get("RANK", "0") == os.environ["FAIL_RANK"]:
        raise RuntimeError("injected failure")
    return original(self, prompts)

textual_inversion.TextualInversionTask.conditioning = conditioning
sys.exit(textual_inversion.main(sys.argv[1:]))
"""
NOISE = ("torchvision", "pip install", "kernels", "Writing model shards", "Traceback", "Connection closed", "gloo")


def _crash_run(model: Path, data: Path, tmp_path: Path, processes: int, fail_rank: int) -> tuple[dict[int, str], str]:
    """Run the failing script on `processes` processes (torchrun for 2): (each rank's output,
    torchrun's own report)."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    script = tmp_path / "failing_train.py"
    script.write_text(_FAILING_SCRIPT)
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = train_argv(model, data, out, "--max_train_steps", "6", "--train_batch_size", "1", "--checkpointing_steps",
                      "0")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "FAIL_RANK": str(fail_rank)}
    if processes == 1:
        done = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 1, done.stderr
        return {0: done.stdout + done.stderr}, ""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--log-dir",
                str(logs), "--redirects", "3"]
    done = subprocess.run([*launcher, str(script), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    outputs = {}
    for rank in range(processes):
        files = [next(logs.rglob(f"attempt_0/{rank}/{stream}.log")) for stream in ("stdout", "stderr")]
        outputs[rank] = "".join(path.read_text() for path in files)
    return outputs, done.stdout + done.stderr


def _lines(output: str) -> list[str]:
    """What a person reads: every line, with progress bars (redrawn with \\r) left out."""
    return [line for line in output.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
            and "?it/s" not in line and "Loading pipeline components" not in line]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_crash_prints_the_one_error_line_and_nothing_else(processes, tiny_sd1_path, training_images, tmp_path):
    """Every process ends with the same error line, naming the failure (not a peer's broken
    connection) and the files the main process saved; no library noise, no traceback."""
    outputs, _ = _crash_run(tiny_sd1_path, training_images, tmp_path, processes, fail_rank=processes - 1)
    out = tmp_path / "out"
    (log,) = out.glob("crash-*.log")
    where = " on process 1" if processes == 2 else ""
    expected = (f"error: training failed after step 3{where} (RuntimeError: injected failure); saved "
                f"{out / 'my-thing.pt'}, {out / 'my-thing.safetensors'}, {out / 'checkpoint-3'}; traceback in {log}")
    for rank, output in outputs.items():
        lines = _lines(output)
        assert lines[-1] == expected, (rank, output)
        errors = [line for line in lines if "error" in line.lower() or "warn" in line.lower()]
        assert errors == [expected], (rank, output)
        assert not [noise for noise in NOISE if noise in output], (rank, output)


def test_a_failure_on_another_process_is_saved_once_by_the_main_one(tiny_sd1_path, training_images, tmp_path):
    """Rank 1 fails in step 4: the main process saves step 3 (embedding and checkpoint) once,
    only the failing rank writes a traceback, and both processes exit non-zero after the save."""
    outputs, launcher = _crash_run(tiny_sd1_path, training_images, tmp_path, 2, fail_rank=1)
    failed = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\n\s*exitcode\s*:\s*(-?\d+)", launcher))
    assert set(failed) == {"0", "1"} and "0" not in failed.values(), launcher  # torchrun lists every failed rank
    out = tmp_path / "out"
    assert load_embedding(out / "my-thing.pt").step == 3
    assert load_checkpoint(out / "checkpoint-3", "textual_inversion").step == 3
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-3"]
    logs = list(out.glob("crash-*.log"))
    assert len(logs) == 1 and logs[0].name.endswith("-rank1.log") and "injected failure" in logs[0].read_text()
    for output in outputs.values():
        assert f"saved {out / 'my-thing.pt'}" in _lines(output)[-1], output
