"""Cloud jobs that change shape: a checkpoint resumes exactly on another number of processes
with the same global batch (2 → 1 → 2), another global batch is refused unless accepted, two
"nodes" (torchrun c10d on 127.0.0.1) train as one process does and stop together, and a
checkpoint limit never deletes the checkpoint a run resumed from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, train_argv

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.hypernetworks import load_hypernetwork
from tinv_lib.training.preflight import ArgumentError

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
# Adam's epsilon 1e-4: with 1e-8, gradient elements near zero turn the all-reduce's float
# rounding into visible update differences (see test_two_processes_equal_one_process).
FLAGS = ("--learning_rate", "0.001", "--adam_epsilon", "1e-4", "--template_file", "subject", "--shuffle_tags",
         "--flip_p", "0.5")
SCRIPTS = {"ti": "train_textual_inversion.py", "hn": "train_hypernetwork.py"}


def _argv(trainer: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    hypernetwork = trainer == "hn"
    return train_argv(model, data, out, *FLAGS, *extra, name="hn" if hypernetwork else "tok", initializer=None,
                      hypernetwork=hypernetwork, off=("report", "validation", "save"))


def _launch(trainer: str, processes: int, argv: list[str], torchrun: tuple[str, ...] = ()) -> subprocess.Popen:
    script = str(ROOT / SCRIPTS[trainer])
    if processes > 1 or torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", *(torchrun or ("--nproc_per_node", str(processes))),
                   script, *argv]
    else:
        command = [sys.executable, script, *argv]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(trainer: str, processes: int, argv: list[str]) -> str:
    process = _launch(trainer, processes, argv)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def _trained(trainer: str, out: Path) -> dict[str, torch.Tensor]:
    if trainer == "ti":
        return {"vectors": load_embedding(out / "tok.pt").vectors}
    return load_hypernetwork(out / "hn.pt").state_dict()


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


@pytest.mark.parametrize("trainer", ["ti", "hn"])
def test_resume_on_another_number_of_processes_equals_the_uninterrupted_run(trainer, tiny_sd1_path, training_images,
                                                                           tmp_path):
    whole, chain = tmp_path / "whole", tmp_path / "chain"
    two = ("--train_batch_size", "2", "--checkpointing_steps", "2")
    one = ("--train_batch_size", "4", "--checkpointing_steps", "2")
    _run(trainer, 2, _argv(trainer, tiny_sd1_path, training_images, whole, "--max_train_steps", "6", *two))
    _run(trainer, 2, _argv(trainer, tiny_sd1_path, training_images, chain, "--max_train_steps", "2", *two))
    resumed = _run(trainer, 1, _argv(trainer, tiny_sd1_path, training_images, chain, "--max_train_steps", "4", *one,
                                     "--resume_from_checkpoint", "latest"))
    assert "resumed from" in resumed and "checkpoint-2 at step 2" in resumed and "notice: " not in resumed
    _run(trainer, 2, _argv(trainer, tiny_sd1_path, training_images, chain, "--max_train_steps", "6", *two,
                           "--resume_from_checkpoint", "latest"))
    expected, got = _trained(trainer, whole), _trained(trainer, chain)
    assert all(torch.allclose(expected[key], got[key], atol=1e-5, rtol=0) for key in expected)
    shapes = [(_state(chain / f"checkpoint-{step}")["world_size"], _state(chain / f"checkpoint-{step}")["global_batch"])
              for step in (2, 4, 6)]
    assert shapes == [(2, 4), (1, 4), (2, 4)]


def test_another_global_batch_is_refused_unless_accepted(tiny_sd1_path, training_images, tmp_path, monkeypatch, capsys):
    from tinv_lib.training.textual_inversion import main, parse_args

    out = tmp_path / "run"
    base = ("--checkpointing_steps", "2", "--gradient_accumulation_steps", "2")
    assert main(_argv("ti", tiny_sd1_path, training_images, out, "--max_train_steps", "2", "--train_batch_size", "2",
                      *base)) == 0
    assert _state(out / "checkpoint-2")["global_batch"] == 4
    again = _argv("ti", tiny_sd1_path, training_images, out, "--max_train_steps", "4", "--train_batch_size", "1", *base,
                  "--resume_from_checkpoint", "latest")
    with pytest.raises(ArgumentError) as refused:
        parse_args(again)
    message = str(refused.value)
    assert "global batch of 4 (2 per process x 1 processes x 2 accumulation)" in message
    assert "this run's is 2 (1 per process x 1 processes x 2 accumulation)" in message and "\n" not in message
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it: 1 x 2 x 2 = 4 again
    parse_args(again)
    monkeypatch.delenv("WORLD_SIZE")
    capsys.readouterr()
    assert main([*again, "--accept_new_global_batch"]) == 0
    assert "from step 2 on, the data order differs" in capsys.readouterr().out
    assert _state(out / "checkpoint-4")["global_batch"] == 2


def test_checkpoint_limit_never_deletes_the_checkpoint_resumed_from(tiny_sd1_path, training_images, tmp_path):
    from tinv_lib.training.textual_inversion import main

    out = tmp_path / "run"
    assert main(_argv("ti", tiny_sd1_path, training_images, out, "--max_train_steps", "6",
                      "--checkpointing_steps", "2")) == 0
    assert main(_argv("ti", tiny_sd1_path, training_images, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                      "--checkpoints_total_limit", "1", "--resume_from_checkpoint", str(out / "checkpoint-2"))) == 0
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert main(_argv("ti", tiny_sd1_path, training_images, out, "--max_train_steps", "8", "--checkpointing_steps", "2",
                      "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest")) == 0
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def _nodes(trainer: str, argv: list[str], port: int) -> list[subprocess.Popen]:
    rendezvous = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"tinv-{port}")
    return [_launch(trainer, 1, argv, torchrun=rendezvous) for _ in range(2)]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_train_as_one_process_and_write_once(tiny_sd1_path, training_images, tmp_path):
    flags = ("--max_train_steps", "4", "--checkpointing_steps", "2")
    nodes = _nodes("ti", _argv("ti", tiny_sd1_path, training_images, tmp_path / "nodes", *flags,
                               "--train_batch_size", "2"), _free_port())
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    _run("ti", 1, _argv("ti", tiny_sd1_path, training_images, tmp_path / "one", *flags, "--train_batch_size", "4"))
    one, two = _trained("ti", tmp_path / "one")["vectors"], _trained("ti", tmp_path / "nodes")["vectors"]
    assert torch.allclose(one, two, atol=1e-5, rtol=0)
    joined = "\n".join(outputs)
    assert joined.count("Saved step 4") == 1 and "2 processes" in joined  # only the global main process writes
    assert len(list((tmp_path / "nodes").glob("settings-*.json"))) == 1
    assert _state(tmp_path / "nodes" / "checkpoint-4")["world_size"] == 2


def test_sigterm_to_either_node_stops_both_with_one_checkpoint(tiny_sd1_path, training_images, tmp_path):
    out = tmp_path / "nodes"
    argv = _argv("ti", tiny_sd1_path, training_images, out, "--max_train_steps", "5000", "--checkpointing_steps", "5000",
                 "--train_batch_size", "2", "--log_csv_steps", "1")
    nodes = _nodes("ti", argv, _free_port())
    loss_csv = out / "textual_inversion_loss.csv"
    deadline = time.time() + 120
    while not (loss_csv.is_file() and len(loss_csv.read_text().splitlines()) > 3) and time.time() < deadline:
        time.sleep(0.2)
    nodes[1].send_signal(signal.SIGTERM)  # the second node's launcher, as a preemption would
    outputs = [node.communicate(timeout=120)[0] for node in nodes]
    joined = "\n".join(outputs)
    assert all(node.returncode != 0 for node in nodes), joined  # both stopped, neither finished 5000 steps
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, joined
    step = _state(checkpoints[0])["step"]
    assert 3 <= step < 5000 and load_embedding(out / "tok.pt").step == step
    assert "Training interrupted at step" in joined


def test_early_stopping_on_two_processes_stops_where_one_process_does(tiny_sd1_path, training_images, tmp_path):
    """DVAR's stop is decided on the main process and agreed by every process: 2 processes × batch
    2 stop at the step 1 process × batch 4 stops at, with the same vectors and best step, both
    ranks exit 0, and the best file is written once."""
    flags = ("--max_train_steps", "40", "--learning_rate", "0.05", "--validation_loss_steps", "1",
             "--early_stopping", "dvar", "--early_stopping_window", "10", "--early_stopping_threshold", "0.15",
             "--keep_best")
    two = _run("ti", 2, _argv("ti", tiny_sd1_path, training_images, tmp_path / "two", *flags, "--train_batch_size", "2"))
    _run("ti", 1, _argv("ti", tiny_sd1_path, training_images, tmp_path / "one", *flags, "--train_batch_size", "4"))
    one_file, two_file = load_embedding(tmp_path / "one" / "tok.pt"), load_embedding(tmp_path / "two" / "tok.pt")
    assert 10 < one_file.step == two_file.step < 40, two
    assert two.count(f"early stopping at step {two_file.step}") == 1
    assert torch.allclose(one_file.vectors, two_file.vectors, atol=1e-5, rtol=0)
    best = [load_embedding(tmp_path / run / "tok-best.safetensors") for run in ("one", "two")]
    assert best[0].step == best[1].step and torch.allclose(best[0].vectors, best[1].vectors, atol=1e-5, rtol=0)
