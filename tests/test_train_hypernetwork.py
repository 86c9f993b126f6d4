"""train_hypernetwork.py on tiny SD1 and SDXL: it learns, the base model stays untouched, resume
is exact, and 2 processes equal 1 — all through the same training core as textual inversion."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, frozen_state, run_training, train_argv

from tinv_lib.hypernetworks import load_hypernetwork
from tinv_lib.models.loading import load_base_model
from tinv_lib.training.checkpoints import list_checkpoints
from tinv_lib.training.hypernetwork import HypernetworkTask, main, parse_args
from tinv_lib.training.task import TrainingHooks

OFF = ("validation", "report", "save")  # checkpoints stay at the trainer's default unless a test says


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(model, data, out, *extra, name="hn", hypernetwork=True, off=OFF)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_hypernetwork_learns_and_leaves_the_base_model_untouched(arch, request, training_images, tmp_path):
    from testing.evaluation import fixed_batch_loss
    from tinv_lib.training.data import load_images

    model = request.getfixturevalue(f"tiny_{arch}_path")
    before = frozen_state(load_base_model(model)[0])
    args = parse_args(_argv(model, training_images, tmp_path, "--max_train_steps", "60", "--learning_rate", "0.002",
                            "--checkpointing_steps", "0", "--train_batch_size", "4", "--template_file", "none"))
    task = HypernetworkTask(args)
    images, _, _ = load_images(training_images, 64, 16, "buckets", False, 8)
    pixels = torch.stack([image.pixels for image in images])
    losses = {}

    def measure(run) -> None:
        losses["start"] = fixed_batch_loss(run.family, pixels, task.conditioning, ["picture"] * 4, seed=5, repeats=8)

    assert run_training(args, task, TrainingHooks(on_start=measure)) == 0
    losses["end"] = fixed_batch_loss(task.family, pixels, task.conditioning, ["picture"] * 4, seed=5, repeats=8)
    print(f"{arch} fixed-batch loss: {losses['start']:.5f} -> {losses['end']:.5f}")
    assert losses["end"] < losses["start"]
    after = frozen_state(task.family.pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key].cpu()) for key in before), "a base-model weight changed"
    saved = load_hypernetwork(tmp_path / "hn.pt")
    assert saved.step == 60 and sorted(saved.sizes) == sorted(task.network.sizes)
    assert torch.load(tmp_path / "hn.pt", weights_only=True)["name"] == "hn"


def _sigterm_when_checkpoint_appears(out: Path) -> threading.Thread:
    def watch() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(out):
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_resume_after_sigterm_is_exact(arch, request, training_images, tmp_path):
    model = request.getfixturevalue(f"tiny_{arch}_path")
    flags = ("--max_train_steps", "30", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
             "--learning_rate", "0.001", "--shuffle_tags", "--flip_p", "0.5", "--latent_sampling", "random",
             "--dropout_structure", "0, 0.1, 0", "--activation_func", "relu", "--train_batch_size", "2",
             # 1,4,1 on the tiny width 32 makes 32x128 weights, above bitsandbytes' 4096-element
             # floor for 8-bit state, so the checkpoint really holds quantized AdamW state.
             "--layer_structure", "1,4,1", "--use_8bit_adam")
    whole = tmp_path / "whole"
    assert main(_argv(model, training_images, whole, *flags)) == 0
    parted = tmp_path / "parted"
    watcher = _sigterm_when_checkpoint_appears(parted)
    assert main(_argv(model, training_images, parted, *flags)) == 143
    watcher.join()
    stopped = load_hypernetwork(parted / "hn.pt").step
    assert 3 <= stopped < 30
    from tinv_lib.training.checkpoints import load_checkpoint

    optimizer = load_checkpoint(list_checkpoints(parted)[-1], "hypernetwork").optimizer
    quantized = [s["__bnb_optimizer_quant_state__"] for s in optimizer["state"].values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quantized), "no 8-bit AdamW state in the checkpoint"
    assert main(_argv(model, training_images, parted, *flags, "--resume_from_checkpoint", "latest")) == 0
    a, b = load_hypernetwork(whole / "hn.pt").state_dict(), load_hypernetwork(parted / "hn.pt").state_dict()
    assert load_hypernetwork(parted / "hn.pt").step == 30
    assert all(torch.allclose(a[key], b[key], atol=1e-6, rtol=0) for key in a)


def test_resume_from_hypernetwork_file_continues_step_and_optimizer(tiny_sd1_path, training_images, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_argv(tiny_sd1_path, training_images, first, "--max_train_steps", "3", "--checkpointing_steps", "0",
                      "--save_optimizer_state")) == 0
    assert (first / "hn.pt.optim").is_file()
    second = tmp_path / "second"
    assert main(_argv(tiny_sd1_path, training_images, second, "--max_train_steps", "5", "--checkpointing_steps", "0",
                      "--resume_from_hypernetwork", str(first / "hn.pt"))) == 0
    assert "steps 3 -> 5" in capsys.readouterr().out
    assert load_hypernetwork(second / "hn.pt").step == 5


def test_the_shared_nan_guard_stops_hypernetwork_training_too(tiny_sd1_path, training_images, tmp_path, capsys):
    code = main(_argv(tiny_sd1_path, training_images, tmp_path, "--learning_rate", "1e30", "--max_train_steps", "6",
                      "--checkpointing_steps", "0"))
    assert code == 3 and "error: loss became" in capsys.readouterr().err
    assert not (tmp_path / "hn.pt").exists()


@pytest.mark.parametrize("script", ["train_hypernetwork.py", "train_textual_inversion.py"])
def test_two_processes_equal_one_process(script, tiny_sd1_path, training_images, tmp_path):
    """Same global batch (1 x 4 vs 2 x 2). Adam's epsilon is raised from 1e-8 to 1e-4 because
    with the default, gradient elements near zero turn float rounding differences of the
    all-reduce into visible update differences (1e-4 after 6 steps); with it they agree to 1e-7."""
    textual = "textual" in script
    extra = ["--template_file", "subject"] if textual else []
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "0", "--learning_rate", "0.001",
             "--adam_epsilon", "1e-4", *extra]

    def _argv(model, data, out, *more):  # the same flags for both trainers; "tok" starts from the default
        return train_argv(model, data, out, *more, name="tok" if textual else "hn", initializer=None,
                          hypernetwork=not textual, off=OFF)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1"}
    runs = {
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / script),
                *_argv(tiny_sd1_path, training_images, tmp_path / "two", *flags, "--train_batch_size", "2")],
        "one": [sys.executable, str(ROOT / script),
                *_argv(tiny_sd1_path, training_images, tmp_path / "one", *flags, "--train_batch_size", "4")],
    }
    for name, command in runs.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("2 processes" if name == "two" else "1 processes") in done.stdout
    name = "tok" if textual else "hn"
    if textual:
        from tinv_lib.embeddings.formats import load_embedding

        one, two = load_embedding(tmp_path / "one" / f"{name}.pt").vectors, load_embedding(tmp_path / "two" / f"{name}.pt").vectors
        assert torch.allclose(one, two, atol=1e-6, rtol=0)
    else:
        one, two = (load_hypernetwork(tmp_path / run / "hn.pt").state_dict() for run in ("one", "two"))
        assert all(torch.allclose(one[key], two[key], atol=1e-6, rtol=0) for key in one)


def test_prompt_encoding_cache_is_bounded(tiny_sd1_path, training_images, tmp_path, monkeypatch):
    """With tag shuffling nearly every prompt is new: the cache keeps the most recent encodings
    within its byte budget instead of growing with the run, and its encodings stay exact."""
    import tinv_lib.training.hypernetwork as hn_training

    args = parse_args(_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "1"))
    task = HypernetworkTask(args)
    from tinv_lib.models.family import family_of

    pipe, info = load_base_model(tiny_sd1_path)
    task.setup(family_of(pipe), info, args, torch.device("cpu"))
    one = task.conditioning(["a photo of a cat"])[0]
    per_prompt = one.numel() * one.element_size()
    monkeypatch.setattr(hn_training, "PROMPT_CACHE_BYTES", 3 * per_prompt)
    for index in range(10):
        task.conditioning([f"a photo of tree {index}", "a photo of a cat"])
    assert len(task._cache) == 3 and task._cache_bytes == 3 * per_prompt
    assert "a photo of a cat" in task._cache  # used every step: never evicted
    assert torch.equal(task.conditioning(["a photo of a cat"])[0], one)
