"""train_textual_inversion.py on tiny models: frozen vocabulary, learning, exact resume, signals."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import frozen_state, run_training, train_argv

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.models.loading import load_base_model
from tinv_lib.training.checkpoints import list_checkpoints
from tinv_lib.training.task import TrainingHooks
from tinv_lib.training.textual_inversion import TextualInversionTask, main, parse_args

ROOT = Path(__file__).resolve().parent.parent


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(model, data, out, "--num_vectors", "3", *extra, initializer="a red tree",
                      off=("validation", "report"))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_only_the_new_vectors_train(arch, request, training_images, tmp_path):
    model = request.getfixturevalue(f"tiny_{arch}_path")
    before = frozen_state(load_base_model(model)[0])
    args = parse_args(_argv(model, training_images, tmp_path, "--max_train_steps", "4", "--learning_rate", "0.05",
                            "--checkpointing_steps", "0", "--save_steps", "0"))
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    after = frozen_state(task.family.pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key].cpu()) for key in before), "a frozen weight changed"
    widths = task.family.widths
    assert [tuple(p.shape) for p in task.parameters()] == [(3, width) for width in widths]
    assert sum(p.numel() for p in task.parameters()) == 3 * sum(widths)
    saved = load_embedding(tmp_path / "my-thing.safetensors")
    if arch == "sdxl":
        assert set(saved.vectors) == {"clip_l", "clip_g"}
        assert saved.dim == {"clip_l": 32, "clip_g": 48}
    else:
        assert tuple(saved.vectors.shape) == (3, 32)
    assert saved.step == 4 and saved.sd_checkpoint == task.model_info.short_hash


@pytest.mark.parametrize("trained", ["clip_l", "clip_g"])
def test_sdxl_trains_one_encoders_vectors_alone(trained, tiny_sdxl_path, training_images, tmp_path):
    """--train_encoders: only the chosen encoder's vectors move; the other's are saved at their
    init values, bit for bit, and the optimizer holds only the trained ones."""
    from tinv_lib.embeddings.create import create_embedding_vectors

    args = parse_args(_argv(tiny_sdxl_path, training_images, tmp_path, "--max_train_steps", "3", "--learning_rate",
                            "0.05", "--train_encoders", trained))
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    family = task.family
    init = create_embedding_vectors(family, "a red tree", 3)
    saved = load_embedding(tmp_path / "my-thing.safetensors").vectors
    other = "clip_g" if trained == "clip_l" else "clip_l"
    assert torch.equal(saved[other], init[other])
    assert (saved[trained] - init[trained]).abs().max() > 1e-3
    assert [p.shape[1] for p in task.parameters()] == [saved[trained].shape[1]]


def test_train_encoders_on_a_one_encoder_model_is_refused(tiny_sd1_path, training_images, tmp_path, capsys):
    code = main(_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "2", "--train_encoders", "clip_g"))
    out = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and out[-1].startswith("error: --train_encoders clip_g: this SD1 model has no text encoder"), out
    assert not (tmp_path / "my-thing.pt").exists()


def test_fixed_batch_loss_drops_after_100_steps(tiny_sd1_path, training_images, tmp_path):
    from testing.evaluation import fixed_batch_loss
    from tinv_lib.training.data import load_images

    args = parse_args(_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "100",
                            "--learning_rate", "0.02", "--checkpointing_steps", "0", "--save_steps", "0",
                            "--template_file", "subject", "--train_batch_size", "4"))
    task = TextualInversionTask(args)
    images, _, _ = load_images(training_images, 64, 16, "buckets", False, 8)
    pixels = torch.stack([image.pixels for image in images])
    prompts = ["a photo of my-thing"] * len(images)

    def loss_now() -> float:
        def conditioning(texts):
            encoded = task.prompt_encoder.encode(texts, {task.name: task.current_embedding()})
            return encoded.embeds, encoded.pooled
        return fixed_batch_loss(task.family, pixels, conditioning, prompts, seed=123, repeats=8)

    losses = {}
    hooks = TrainingHooks(on_start=lambda run: losses.setdefault("start", loss_now()))
    assert run_training(args, task, hooks) == 0
    losses["end"] = loss_now()
    print(f"fixed-batch loss: step 0 {losses['start']:.5f} -> step 100 {losses['end']:.5f}")
    assert losses["end"] < losses["start"]


# ---------------------------------------------------------------- resume, kills and signals

RESUME_STEPS = 32  # many steps after the first checkpoint, so the kill always lands mid-run
RESUME_FLAGS = ("--max_train_steps", str(RESUME_STEPS), "--gradient_accumulation_steps", "2", "--use_8bit_adam",
                "--shuffle_tags", "--train_batch_size", "2", "--checkpointing_steps", "4", "--save_steps", "4",
                "--learning_rate", "0.01", "--seed", "7")


def _run(argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_textual_inversion.py"), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_checkpoint(out: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list_checkpoints(out)
        if found:
            return found[-1]
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def _vectors(path: Path) -> torch.Tensor:
    return load_embedding(path).vectors


def _assert_every_file_is_whole(out: Path) -> None:
    """After a kill: every embedding and checkpoint that exists under its final name loads."""
    from tinv_lib.training.checkpoints import load_checkpoint

    for path in list(out.glob("*.pt")) + list(out.glob("embeddings/*.pt")) + list(out.glob("*.safetensors")):
        assert not path.name.startswith(".")
        load_embedding(path)
    for checkpoint in list_checkpoints(out):
        load_checkpoint(checkpoint, "textual_inversion")


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd1_path, training_images, tmp_path_factory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("uninterrupted")
    process = _run(_argv(tiny_sd1_path, training_images, out, *RESUME_FLAGS))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return _vectors(out / "my-thing.pt")


def test_resume_after_sigkill_equals_uninterrupted_run(uninterrupted, tiny_sd1_path, training_images, tmp_path):
    argv = _argv(tiny_sd1_path, training_images, tmp_path, *RESUME_FLAGS)
    process = _run(argv)
    _wait_for_checkpoint(tmp_path, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _assert_every_file_is_whole(tmp_path)
    killed_at = int(list_checkpoints(tmp_path)[-1].name.split("-")[1])
    assert killed_at < RESUME_STEPS
    resumed = _run([*argv, "--resume_from_checkpoint", "latest"])
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert torch.allclose(_vectors(tmp_path / "my-thing.pt"), uninterrupted, atol=1e-6, rtol=0)
    assert load_embedding(tmp_path / "my-thing.pt").step == RESUME_STEPS
    # Resuming a finished run trains nothing more: never past --max_train_steps.
    again = _run([*argv, "--resume_from_checkpoint", "latest"])
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert load_embedding(tmp_path / "my-thing.pt").step == RESUME_STEPS
    assert not (tmp_path / f"checkpoint-{RESUME_STEPS + 1}").exists()
    assert torch.allclose(_vectors(tmp_path / "my-thing.pt"), uninterrupted, atol=1e-6, rtol=0)


def test_sigterm_saves_and_resume_continues(uninterrupted, tiny_sd1_path, training_images, tmp_path):
    argv = _argv(tiny_sd1_path, training_images, tmp_path, *RESUME_FLAGS)
    process = _run(argv)
    _wait_for_checkpoint(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "interrupted at step" in output
    stopped = load_embedding(tmp_path / "my-thing.pt").step
    assert 4 <= stopped < RESUME_STEPS
    assert list_checkpoints(tmp_path)[-1].name == f"checkpoint-{stopped}"
    resumed = _run([*argv, "--resume_from_checkpoint", "latest"])
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"steps {stopped} -> {RESUME_STEPS}" in output
    assert torch.allclose(_vectors(tmp_path / "my-thing.pt"), uninterrupted, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- bad input

def test_prompts_without_placeholder_fail_before_step_one(tiny_sd1_path, training_images, tmp_path, capsys):
    code = main(_argv(tiny_sd1_path, training_images, tmp_path, "--template_file", "none", "--max_train_steps", "2"))
    out = capsys.readouterr().err
    assert code == 2 and "no training prompt contains the placeholder 'my-thing'" in out
    assert not (tmp_path / "my-thing.pt").exists()


def test_placeholder_that_is_a_vocabulary_word_fails_before_step_one(tiny_sd1_path, training_images, tmp_path, capsys):
    argv = _argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "2")
    argv[argv.index("--placeholder_token") + 1] = "Cat"
    code = main(argv)
    out = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and out[-1].startswith("error: --placeholder_token 'Cat' is already a word"), out
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("settings-*.json"))


def test_empty_dataset_fails_before_step_one(tiny_sd1_path, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    code = main(_argv(tiny_sd1_path, empty, tmp_path / "out", "--max_train_steps", "2"))
    out = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and out[-1].startswith("error:") and "no usable images" in out[-1], out
    assert not (tmp_path / "out" / "my-thing.pt").exists()


def test_nan_loss_stops_without_saving_a_nan_embedding(tiny_sd1_path, training_images, tmp_path, capsys):
    # A good embedding from an earlier run in the same folder must survive the failed run.
    assert main(_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "0")) == 0
    good = (tmp_path / "my-thing.pt").read_bytes()
    capsys.readouterr()
    code = main(_argv(tiny_sd1_path, training_images, tmp_path, "--learning_rate", "1e30", "--max_train_steps", "6",
                      "--save_steps", "1", "--checkpointing_steps", "0",
                      "--norm_mode", "none"))  # direction-only would pull the vectors back onto their sphere
    out = capsys.readouterr().err
    assert code == 3, out
    assert re.search(r"error: loss became (nan|inf) at step \d+: the learning rate \(1e\+30\) is likely too high", out), out
    assert (tmp_path / "my-thing.pt").read_bytes() == good
    for path in (tmp_path / "embeddings").glob("*.pt"):
        assert torch.isfinite(_vectors(path)).all()


def test_config_file_supplies_flags_and_command_line_wins(tiny_sd1_path, training_images, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_sd1_path}"\ntrain_data_dir = "{training_images}"\n'
        'placeholder_token = "from-config"\nmax_train_steps = 99\nlearning_rate = "0.001:5, 0.0001"\n'
    )
    args = parse_args(["--config", str(config), "--max_train_steps", "3"])
    assert args.placeholder_token == "from-config" and args.max_train_steps == 3
    assert str(args.learning_rate) == "0.001:5, 0.0001"
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text("placeholder_token: other\nbogus_flag: 1\n")
    with pytest.raises(Exception, match="unknown setting"):
        parse_args(["--config", str(yaml_config)])


def test_nan_rollback_returns_to_the_last_checkpoint_then_gives_up(tiny_sd1_path, training_images, tmp_path, capsys):
    args = parse_args(_argv(tiny_sd1_path, training_images, tmp_path, "--learning_rate", "0.001:3, 1e30:4, 0.001",
                            "--max_train_steps", "6", "--checkpointing_steps", "3", "--save_steps", "0",
                            "--on_nan", "rollback"))
    reports = []
    code = run_training(args, TextualInversionTask(args), TrainingHooks(on_step=reports.append))
    out = capsys.readouterr().err
    assert out.count("rolled back to step 3, learning rate now x") == 10
    assert code == 3 and "rolled back 10 times" in out
    rolled = [report for report in reports if report.rolled_back]  # the hooks see every rollback
    assert [r.step for r in rolled] == [3] * 10 and not any(math.isfinite(r.loss) for r in rolled)
    assert [r.lr for r in rolled] == [0.001 * 0.5 ** n for n in range(10)]  # each rollback halves the rate
    assert torch.isfinite(load_embedding_vectors(tmp_path / "checkpoint-3")).all()


def load_embedding_vectors(checkpoint: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "trainable.safetensors"))["emb_params"]
