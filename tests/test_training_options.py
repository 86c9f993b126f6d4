"""The options users bring from kohya and OneTrainer: each test checks the mechanism, so it
fails if the option were ignored or wrong (min-SNR weights, noise offset, timestep range,
caption dropout, optimizers with exact resume, EMA, validation loss)."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers import run_training, train_argv

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.training.batches import SampleSettings, build_micro_batch
from tinv_lib.training.data import TrainingImage
from tinv_lib.training.objective import min_snr_weights
from tinv_lib.training.preflight import ArgumentError
from tinv_lib.training.task import TrainingHooks
from tinv_lib.training.textual_inversion import TextualInversionTask, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, data, out, *extra, hooks=None, hypernetwork=False, name="my-thing") -> int:
    """A tiny run (batch 2, 64 px) of either trainer; the exit code."""
    from tinv_lib.training import hypernetwork as hn

    parse, task, rate = (hn.parse_args, hn.HypernetworkTask, "0.001") if hypernetwork else \
        (parse_args, TextualInversionTask, "0.05")
    args = parse(train_argv(model, data, out, "--learning_rate", rate, "--train_batch_size", "2", *extra,
                            name=name, hypernetwork=hypernetwork))
    return run_training(args, task(args), hooks)


def _vectors(path) -> torch.Tensor:
    return load_embedding(path).vectors


# ------------------------------------------------------------------------------ loss and noise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction)
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    gamma = 5.0
    weights = min_snr_weights(scheduler, timesteps, gamma)
    for t, weight in zip(timesteps.tolist(), weights.tolist()):
        alpha_bar = float(scheduler.alphas_cumprod[t])
        snr = alpha_bar / (1 - alpha_bar)
        expected = min(snr, gamma) / (snr if prediction == "epsilon" else snr + 1)
        assert weight == pytest.approx(expected, rel=1e-5)
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0 if prediction == "epsilon" else 0.0, abs=0.01)


def test_snr_gamma_changes_the_loss_the_loop_minimises(tiny_sd1_path, training_images, tmp_path):
    # gamma 0.001 is below the SNR of every timestep of SD's schedule: every sample's weight changes
    assert _run(tiny_sd1_path, training_images, tmp_path / "plain", "--max_train_steps", "2") == 0
    assert _run(tiny_sd1_path, training_images, tmp_path / "snr", "--max_train_steps", "2", "--snr_gamma", "0.001") == 0
    plain = list(csv.reader(open(tmp_path / "plain" / "textual_inversion_loss.csv")))[-1]
    snr = list(csv.reader(open(tmp_path / "snr" / "textual_inversion_loss.csv")))[-1]
    assert plain[3] != snr[3]
    assert not torch.equal(_vectors(tmp_path / "plain" / "my-thing.pt"), _vectors(tmp_path / "snr" / "my-thing.pt"))


def _settings(**changes) -> SampleSettings:
    base = dict(seed=3, templates=["a photo of [name], [filewords]"], name="tok", shuffle_tags=False, tag_dropout=0.0,
                flip_p=0.0, latent_sampling="deterministic", latent_scale=1.0, timesteps=(0, 1000))
    return SampleSettings(**{**base, **changes})


def _images(count: int = 8) -> list[TrainingImage]:
    images = []
    for index in range(count):
        image = TrainingImage(path=None, caption=f"red, circle {index}", size=(32, 32), pixels=torch.zeros(3, 32, 32),
                              weight=None)
        image.latents[False] = (torch.randn(4, 4, 4), torch.ones(4, 4, 4))
        images.append(image)
    return images


def test_noise_offset_shifts_each_channel_of_each_sample_by_a_constant():
    images = _images()
    members = list(enumerate(range(len(images))))
    plain = build_micro_batch(images, members, 5, _settings())
    offsets = []
    for k in range(40):
        shifted = build_micro_batch(images, members, k, _settings(noise_offset=0.1))
        base = build_micro_batch(images, members, k, _settings())
        difference = shifted.noise - base.noise
        per_channel = difference.mean(dim=(2, 3), keepdim=True)
        assert torch.allclose(difference, per_channel.expand_as(difference), atol=1e-6)  # constant over the image
        offsets.append(per_channel.flatten())
    offsets = torch.cat(offsets)
    assert offsets.std().item() == pytest.approx(0.1, rel=0.15)  # 0.1 x a standard normal per sample and channel
    assert torch.equal(build_micro_batch(images, members, 5, _settings()).noise, plain.noise)  # off: untouched


def test_timesteps_stay_in_the_range():
    images = _images()
    members = list(enumerate(range(len(images))))
    drawn = torch.cat([build_micro_batch(images, members, k, _settings(timesteps=(200, 300))).timesteps for k in range(30)])
    assert drawn.min() >= 200 and drawn.max() < 300 and len(set(drawn.tolist())) > 50


def test_caption_dropout_drops_the_whole_caption_and_keeps_the_name():
    images = _images()
    members = list(enumerate(range(len(images))))
    prompts = [p for k in range(50) for p in build_micro_batch(images, members, k, _settings(caption_dropout=0.3)).prompts]
    dropped = [p for p in prompts if "red" not in p]
    assert all(p == "a photo of tok, " for p in dropped)
    assert len(dropped) / len(prompts) == pytest.approx(0.3, abs=0.05)
    always = build_micro_batch(images, members, 1, _settings(caption_dropout=1.0)).prompts
    assert always == ["a photo of tok, "] * len(images)
    kept = build_micro_batch(images, members, 1, _settings()).prompts
    assert kept == [f"a photo of tok, red, circle {i}" for i in range(len(images))]


# ------------------------------------------------------------------------------ optimizers


OPTIMIZER_CLASSES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor",
                     "schedulefree_adamw": "AdamWScheduleFree"}


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_CLASSES))
def test_each_optimizer_trains_and_resumes_exactly(optimizer, tiny_sd1_path, training_images, tmp_path):
    flags = ("--optimizer", optimizer, "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2")
    if optimizer == "prodigy":
        flags += ("--optimizer_args", "d0=1e-3")
    used = []
    hooks = TrainingHooks(on_start=lambda run: used.append(type(run.optimizer.optimizer).__name__))
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run(tiny_sd1_path, training_images, whole, "--max_train_steps", "4", *flags, hooks=hooks) == 0
    assert _run(tiny_sd1_path, training_images, part, "--max_train_steps", "2", *flags) == 0
    assert _run(tiny_sd1_path, training_images, part, "--max_train_steps", "4", *flags,
                "--resume_from_checkpoint", "latest") == 0
    assert used == [OPTIMIZER_CLASSES[optimizer]]
    final = _vectors(whole / "my-thing.pt")
    assert torch.equal(final, _vectors(part / "my-thing.pt"))
    from safetensors.torch import load_file

    start = load_file(str(part / "checkpoint-2" / "trainable.safetensors"))
    assert not torch.equal(next(iter(start.values())).cpu(), final)  # it trained
    if optimizer == "schedulefree_adamw":  # files hold the evaluation weights, checkpoints the training ones
        trained = load_file(str(whole / "checkpoint-4" / "trainable.safetensors"))
        assert not torch.allclose(next(iter(trained.values())).cpu(), final)


def test_optimizer_sidecar_names_its_optimizer_and_a_different_one_starts_fresh(tiny_sd1_path, training_images,
                                                                                tmp_path, capfd):
    first = tmp_path / "first"
    assert _run(tiny_sd1_path, training_images, first, "--max_train_steps", "1", "--save_optimizer_state",
                "--optimizer", "adafactor") == 0
    sidecar = torch.load(first / "my-thing.pt.optim", weights_only=True)
    assert sidecar["optimizer_name"] == "Adafactor" and "hash" in sidecar
    capfd.readouterr()
    assert _run(tiny_sd1_path, training_images, tmp_path / "second", "--max_train_steps", "2",
                "--resume_from_embedding", str(first / "my-thing.pt")) == 0
    assert "holds Adafactor state, not AdamW; starting with a fresh optimizer" in capfd.readouterr().err


# ------------------------------------------------------------------------------ EMA


def test_ema_equals_the_closed_form_and_save_ema_saves_it(tiny_sd1_path, training_images, tmp_path):
    decay, history = 0.6, []
    run_of = {}

    def on_step(report) -> None:
        history.append(run_of["run"].task.state_tensors()["emb_params"].detach().clone().cpu())

    hooks = TrainingHooks(on_start=lambda run: (run_of.update(run=run),
                                                history.append(run.task.state_tensors()["emb_params"].clone().cpu())),
                          on_step=on_step)
    out = tmp_path / "ema"
    assert _run(tiny_sd1_path, training_images, out, "--max_train_steps", "6", "--ema_decay", str(decay), "--save_ema",
                "--checkpointing_steps", "6", hooks=hooks) == 0
    average = history[0].double()
    for n, weights in enumerate(history[1:]):
        d = min(decay, (1 + n) / (10 + n))
        average = d * average + (1 - d) * weights.double()
    saved = _vectors(out / "my-thing.pt")
    assert torch.allclose(saved.double(), average, atol=1e-6)
    assert not torch.allclose(saved, history[-1], atol=1e-4)  # the average, not the last weights
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / "checkpoint-6" / "trainable.safetensors"))["emb_params"].cpu(), history[-1])
    assert torch.allclose(load_file(str(out / "checkpoint-6" / "ema.safetensors"))["emb_params"].double(), average,
                          atol=1e-6)


def test_ema_resumes_exactly(tiny_sd1_path, training_images, tmp_path):
    flags = ("--ema_decay", "0.7", "--save_ema", "--checkpointing_steps", "2")
    assert _run(tiny_sd1_path, training_images, tmp_path / "whole", "--max_train_steps", "4", *flags) == 0
    assert _run(tiny_sd1_path, training_images, tmp_path / "part", "--max_train_steps", "2", *flags) == 0
    assert _run(tiny_sd1_path, training_images, tmp_path / "part", "--max_train_steps", "4", *flags,
                "--resume_from_checkpoint", "latest") == 0
    assert torch.equal(_vectors(tmp_path / "whole" / "my-thing.pt"), _vectors(tmp_path / "part" / "my-thing.pt"))


# ------------------------------------------------------------------------------ validation loss


def _validation_rows(out) -> list[list[str]]:
    return list(csv.reader(open(out / "validation_loss.csv")))[1:]


def test_validation_loss_is_held_out_fixed_and_reproducible(tiny_sd1_path, training_images, tmp_path):
    import json

    flags = ("--max_train_steps", "4", "--validation_split", "0.25", "--validation_loss_steps", "2")
    assert _run(tiny_sd1_path, training_images, tmp_path / "a", *flags) == 0
    assert _run(tiny_sd1_path, training_images, tmp_path / "b", *flags) == 0
    rows = _validation_rows(tmp_path / "a")
    assert [row[0] for row in rows] == ["2", "4"]
    assert rows == _validation_rows(tmp_path / "b")  # same step, same number
    settings = json.loads(next((tmp_path / "a").glob("settings-*.json")).read_text())
    assert settings["num_of_dataset_images"] == 3  # one of the four images held out
    # The same held-out noise and timesteps in a run with another seed: at step 0 (nothing trained
    # yet, learning rate 0 for the first steps) both runs measure the same number.
    zero = ("--max_train_steps", "2", "--validation_split", "0.25", "--validation_loss_steps", "1",
            "--learning_rate", "0:2, 0.05")
    assert _run(tiny_sd1_path, training_images, tmp_path / "c", *zero, "--seed", "1") == 0
    assert _run(tiny_sd1_path, training_images, tmp_path / "d", *zero, "--seed", "1", "--noise_offset", "0.2",
                "--snr_gamma", "2") == 0
    assert _validation_rows(tmp_path / "c") == _validation_rows(tmp_path / "d")


def test_validation_data_dir_is_used_and_hypernetworks_take_the_options(tiny_sd1_path, training_images, tmp_path):
    out = tmp_path / "hn"
    assert _run(tiny_sd1_path, training_images, out, "--max_train_steps", "4", "--validation_data_dir",
                str(training_images), "--validation_loss_steps", "2", "--optimizer", "prodigy", "--ema_decay", "0.9",
                "--save_ema", "--snr_gamma", "5", "--noise_offset", "0.05", "--checkpointing_steps", "2",
                hypernetwork=True, name="hn") == 0
    assert [row[0] for row in _validation_rows(out)] == ["2", "4"]
    assert (out / "checkpoint-4" / "ema.safetensors").is_file()
    sidecar_free = torch.load(out / "hn.pt", weights_only=False)
    assert sidecar_free["step"] == 4


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("flags", "message"), [
    (("--optimizer", "prodigy", "--optimizer_args", "bogus=1"), "prodigy has no argument bogus"),
    (("--optimizer_args", "lr"), "expected key=value"),
    (("--optimizer", "prodigy", "--use_8bit_adam"), "cannot go with --optimizer prodigy"),
    (("--save_ema",), "--save_ema needs --ema_decay"),
    (("--ema_decay", "1.5"), "--ema_decay must be in (0, 1)"),
    (("--snr_gamma", "0"), "--snr_gamma must be positive"),
    (("--noise_offset", "-1"), "--noise_offset must be 0 (off) or positive"),
    (("--min_timestep", "500", "--max_timestep", "400"), "must be above --min_timestep"),
    (("--caption_dropout", "2"), "--caption_dropout must be in [0, 1]"),
    (("--validation_split", "1"), "--validation_split must be in [0, 1)"),
    (("--validation_split", "0.2", "--validation_data_dir", "."), "give one"),
])
def test_bad_option_values_are_refused_before_the_model_loads(flags, message, training_images, tmp_path):
    with pytest.raises(ArgumentError, match=None) as refused:
        parse_args(train_argv(tmp_path / "no-model-needed", training_images, tmp_path, *flags))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_use_8bit_adam_is_an_alias(training_images, tmp_path, tiny_sd1_path):
    args = parse_args(train_argv(tiny_sd1_path, training_images, tmp_path, "--use_8bit_adam"))
    assert args.optimizer == "adamw8bit"
