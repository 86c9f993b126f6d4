"""train_textual_inversion.py on tiny FLUX.1 and SD3 models (issue 33): the prompt as the
pipelines encode it, the flow-matching objective, frozen weights, per-encoder vectors, exact
resume, files that load back."""

from __future__ import annotations

import shutil

import numpy
import pytest
import torch
from helpers import run_training, train_argv
from safetensors.torch import load_file

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.generation.txt2img import generate
from tinv_lib.models import flow
from tinv_lib.models.family import family_of
from tinv_lib.models.loading import load_base_model
from tinv_lib.prompts.encoding import PromptEncoder
from tinv_lib.training.textual_inversion import TextualInversionTask, main, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a red circle", "blue square, (white background:1.0)"]


def _argv(model, data, out, *extra: str) -> list[str]:
    return train_argv(model, data, out, "--num_vectors", "2", "--train_batch_size", "2", *extra,
                      initializer="a red tree", off=("validation", "report"))


def _weights(pipe) -> dict[str, torch.Tensor]:
    """Every weight of every model of the pipeline: what training must leave untouched."""
    return {f"{name}.{key}": value.detach().clone() for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) for key, value in module.state_dict().items()}


@pytest.fixture(params=["flux", "sd3"])
def flow_model(request):
    return request.getfixturevalue(f"tiny_{request.param}_path")


def test_prompts_encode_bit_for_bit_as_the_pipelines_encode_them(tiny_flux_path, tiny_sd3_path):
    flux, _ = load_base_model(tiny_flux_path)
    encoded = PromptEncoder.from_pipeline(flux).encode(PROMPTS[:1] * 2)
    embeds, pooled, _ = flux.encode_prompt(PROMPTS[:1] * 2, prompt_2=None, max_sequence_length=512)
    assert torch.equal(encoded.embeds, embeds) and torch.equal(encoded.pooled, pooled)
    sd3, _ = load_base_model(tiny_sd3_path)
    encoded = PromptEncoder.from_pipeline(sd3).encode(PROMPTS[:1])
    embeds, _, pooled, _ = sd3.encode_prompt(PROMPTS[:1], None, None, do_classifier_free_guidance=False)
    assert encoded.embeds.shape == (1, 77 + 256, 96)
    assert torch.equal(encoded.embeds, embeds) and torch.equal(encoded.pooled, pooled)


def test_flux_transformer_call_packs_as_the_pipeline_does(tiny_flux_path):
    """The objective's FLUX.1 call (2x2 patches, positions, guidance) equals the pipeline's own
    packing helpers around the transformer, and the target is the velocity noise - latents."""
    from diffusers import FluxPipeline

    pipe, _ = load_base_model(tiny_flux_path)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    timesteps = torch.tensor([100, 900])
    encoded = PromptEncoder.from_pipeline(pipe).encode(PROMPTS)
    hidden, pooled = encoded.embeds, encoded.pooled
    with torch.no_grad():
        prediction, target = flow.prediction_and_target(pipe, "flux", latents, noise, timesteps, (hidden, pooled),
                                                        torch.float32)
        clean = latents - pipe.vae.config.shift_factor * pipe.vae.config.scaling_factor
        sigmas = flow.noise_levels(timesteps, pipe.scheduler.config, 16)
        noisy = (1 - sigmas[:, None, None, None]) * clean + sigmas[:, None, None, None] * noise
        packed = FluxPipeline._pack_latents(noisy, 2, 16, 8, 8)
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        out = pipe.transformer(hidden_states=packed, timestep=sigmas, guidance=torch.ones(2), pooled_projections=pooled,
                               encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=ids,
                               return_dict=False)[0]
        expected = FluxPipeline._unpack_latents(out, 64, 64, 8)
    assert torch.allclose(prediction, expected, atol=1e-6) and torch.equal(target, noise - clean)


def test_noise_levels_follow_each_familys_shift():
    quantile = torch.tensor([499])  # the logit-normal's median: u = 0.5
    sd3 = flow.noise_levels(quantile, {"shift": 3.0}, 4096)
    assert sd3.item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=1e-3)  # 0.75
    dev = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
           "max_image_seq_len": 4096}
    small, large = flow.noise_levels(quantile, dev, 256), flow.noise_levels(quantile, dev, 4096)
    assert small.item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=1e-3)  # e^mu/(e^mu+1), mu=.5
    assert large.item() > small.item()  # more tokens, noisier
    levels = flow.noise_levels(torch.arange(1000), {"shift": 1.0}, 16)
    assert torch.all(levels[1:] > levels[:-1]) and levels[0].item() == pytest.approx(1 - levels[-1].item(), abs=1e-6)
    assert levels[0].item() == pytest.approx(torch.sigmoid(torch.tensor(-3.2905)).item(), abs=1e-4)  # Phi^-1(0.0005)


def test_only_the_new_vectors_train_and_the_files_load_back(flow_model, training_images, tmp_path):
    before = _weights(load_base_model(flow_model)[0])
    args = parse_args(_argv(flow_model, training_images, tmp_path, "--max_train_steps", "3", "--learning_rate", "0.05"))
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    after = _weights(task.family.pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key].cpu()) for key in before), "a frozen weight changed"
    keys = task.family.architecture.embedding_keys
    assert [tuple(p.shape) for p in task.parameters()] == [(2, width) for width in task.family.widths]
    for suffix in (".safetensors", ".pt"):
        saved = load_embedding(tmp_path / f"my-thing{suffix}")
        assert list(saved.vectors) == list(keys) and saved.step == (3 if suffix == ".safetensors" else None)
        for key in keys:
            assert torch.equal(saved.vectors[key], task.state_tensors()[key].cpu())
            assert (saved.vectors[key] - task.initial[key]).abs().max() > 1e-4, f"{key} did not train"
    raw = load_file(tmp_path / "my-thing.safetensors")
    assert torch.equal(raw["t5xxl"], raw["t5"])


def test_train_encoders_takes_a_comma_list(tiny_sd3_path, training_images, tmp_path, capsys):
    args = parse_args(_argv(tiny_sd3_path, training_images, tmp_path, "--max_train_steps", "2", "--learning_rate",
                            "0.05", "--train_encoders", "t5,clip_g"))
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    saved = load_embedding(tmp_path / "my-thing.safetensors").vectors
    assert torch.equal(saved["clip_l"], task.initial["clip_l"])
    assert all((saved[key] - task.initial[key]).abs().max() > 1e-4 for key in ("clip_g", "t5"))
    with pytest.raises(SystemExit) as caught:
        parse_args(_argv(tiny_sd3_path, training_images, tmp_path / "x", "--train_encoders", "t5,clip_x"))
    assert caught.value.code == 2
    assert "'t5,clip_x': give all, or a comma list of clip_l, clip_g, t5" in capsys.readouterr().err


def test_snr_gamma_is_refused_for_flow_models_before_loading(tiny_flux_path, training_images, tmp_path, capsys):
    from tinv_lib.models.loading import save_model_config

    configs_only = save_model_config(tiny_flux_path, tmp_path / "configs")  # loading it would fail: no weights
    code = main(_argv(configs_only, training_images, tmp_path / "out", "--max_train_steps", "2", "--snr_gamma", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --snr_gamma weighs DDPM timesteps"), err


@pytest.mark.parametrize("scale", ["none", "vocab_norm"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(scale, tiny_flux_path, training_images, tmp_path):
    flags = ("--learning_rate", "0.02", "--seed", "3", "--checkpointing_steps", "2", "--encoder_lr_scale", scale)
    whole = parse_args(_argv(tiny_flux_path, training_images, tmp_path / "whole", "--max_train_steps", "4", *flags))
    assert run_training(whole, TextualInversionTask(whole)) == 0
    first = parse_args(_argv(tiny_flux_path, training_images, tmp_path / "cut", "--max_train_steps", "4", *flags))
    assert run_training(first, TextualInversionTask(first)) == 0
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    for name in ("my-thing.pt", "my-thing.safetensors"):
        (tmp_path / "cut" / name).unlink()
    again = parse_args(_argv(tiny_flux_path, training_images, tmp_path / "cut", "--max_train_steps", "4", *flags,
                             "--resume_from_checkpoint", "latest"))
    assert run_training(again, TextualInversionTask(again)) == 0
    expected, resumed = (load_embedding(tmp_path / folder / "my-thing.safetensors") for folder in ("whole", "cut"))
    assert resumed.step == 4
    assert all(torch.equal(expected.vectors[key], resumed.vectors[key]) for key in expected.vectors)


def _vocabulary_median(encoder) -> float:
    return float(torch.linalg.vector_norm(encoder.get_input_embeddings().weight.float(), dim=1).median())


@pytest.mark.parametrize(("flow_model", "mode"), [("flux", "vocab_norm"), ("sd3", "vocab_norm"), ("flux", "auto")])
def test_vocab_norm_steps_each_encoder_at_its_vocabularys_scale(flow_model, mode, request, training_images, tmp_path):
    """Adam's first step moves every number by about the learning rate: with `--encoder_lr_scale
    vocab_norm` (the default, auto, on models with T5) each encoder's vectors move by the rate
    times its vocabulary's median norm over CLIP-L's, measured here from the encoders' own
    embedding tables."""
    model = request.getfixturevalue(f"tiny_{flow_model}_path")
    args = parse_args(_argv(model, training_images, tmp_path, "--max_train_steps", "1", "--learning_rate", "0.001",
                            "--encoder_lr_scale", mode, "--adam_epsilon", "1e-12",
                            "--norm_mode", "none"))  # Adam's own step, not retracted onto the init norm
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    encoders = dict(zip(task.family.architecture.embedding_keys, task.family.text_encoders))
    first = _vocabulary_median(encoders["clip_l"])
    for key, encoder in encoders.items():
        moved = (task.state_tensors()[key].cpu() - task.initial[key]).abs().max().item()
        assert moved == pytest.approx(0.001 * _vocabulary_median(encoder) / first, rel=1e-3), key
    assert len({round(task.encoder_lr_scales()[key], 6) for key in encoders}) == len(encoders)  # a rate of its own each


def test_vocab_norm_changes_nothing_on_one_encoder_and_auto_leaves_sdxl_alone(tiny_sd1_path, tiny_sdxl_path,
                                                                               training_images, tmp_path):
    args = parse_args(_argv(tiny_sdxl_path, training_images, tmp_path / "xl", "--max_train_steps", "1"))
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    assert task.encoder_lr_scales() == {"clip_l": 1.0, "clip_g": 1.0} and len(task.parameter_groups()) == 1
    runs = {}
    for scale in ("none", "vocab_norm"):
        args = parse_args(_argv(tiny_sd1_path, training_images, tmp_path / scale, "--max_train_steps", "2",
                                "--encoder_lr_scale", scale))
        assert run_training(args, TextualInversionTask(args)) == 0
        runs[scale] = load_embedding(tmp_path / scale / "my-thing.safetensors").vectors
    assert torch.equal(runs["none"], runs["vocab_norm"])


def _trained_file_and_tinvs_encoding(model, data, out):
    """Two steps of training; the saved embedding, its raw tensors, a fresh pipeline and tinv's
    encoding of "a photo of my-thing" with the embedding."""
    args = parse_args(_argv(model, data, out, "--max_train_steps", "2", "--learning_rate", "0.05"))
    assert run_training(args, TextualInversionTask(args)) == 0
    embedding = load_embedding(out / "my-thing.safetensors")
    pipe, _ = load_base_model(model)
    ours = PromptEncoder.from_pipeline(pipe).encode(["a photo of my-thing"], {"my-thing": embedding})
    return embedding, load_file(out / "my-thing.safetensors"), pipe, ours


def _assert_tinv_and_the_pipeline_draw_alike(pipe, embedding) -> None:
    """tinv with the embedding and the pipeline with its tokens `<m0> <m1>` loaded draw one image."""
    drawn = generate(pipe, "a photo of my-thing", seed=3, steps=3, cfg_scale=3.5, width=64, height=64,
                     embeddings={"my-thing": embedding}).images[0]
    theirs = pipe("a photo of <m0> <m1>", num_inference_steps=3, guidance_scale=3.5, width=64, height=64,
                  generator=torch.Generator().manual_seed(3)).images[0]
    assert numpy.array_equal(numpy.asarray(drawn), numpy.asarray(theirs))


def test_diffusers_draws_with_the_trained_file_loaded_its_documented_way(tiny_flux_path, training_images, tmp_path):
    """The saved file in diffusers' FluxPipeline (one load_textual_inversion per encoder) gives,
    bit for bit, the prompt embeds tinv's encoder gives with the embedding (the T5 placeholder is
    one slot per vector either way), and the pipeline draws the image tinv draws."""
    embedding, state, pipe, ours = _trained_file_and_tinvs_encoding(tiny_flux_path, training_images, tmp_path)
    tokens = ["<m0>", "<m1>"]
    pipe.load_textual_inversion(state["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["t5"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    embeds, pooled, _ = pipe.encode_prompt(["a photo of <m0> <m1>"], prompt_2=None, max_sequence_length=512)
    assert torch.equal(ours.pooled, pooled) and torch.equal(ours.embeds, embeds)
    assert family_of(pipe).architecture.name == "flux"
    _assert_tinv_and_the_pipeline_draw_alike(pipe, embedding)


def test_sd3_draws_with_the_trained_file_loaded_by_hand(tiny_sd3_path, training_images, tmp_path):
    """SD3 pipelines have no textual-inversion loader; the way docs/flux_sd3.md gives (add the
    tokens to each tokenizer, write each key's rows into its encoder's input embeddings) encodes
    the prompt bit for bit as tinv does and draws tinv's image."""
    embedding, state, pipe, ours = _trained_file_and_tinvs_encoding(tiny_sd3_path, training_images, tmp_path)
    tokens = ["<m0>", "<m1>"]
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
                                    ("t5", pipe.tokenizer_3, pipe.text_encoder_3)):
        tokenizer.add_tokens(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)] = state[key]
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of <m0> <m1>", None, None, do_classifier_free_guidance=False)
    assert torch.equal(ours.pooled, pooled) and torch.equal(ours.embeds, embeds)
    _assert_tinv_and_the_pipeline_draw_alike(pipe, embedding)


def test_two_processes_train_as_one(tiny_flux_path, training_images, tmp_path):
    """Batch 2 on one process and batch 1 on each of two (torchrun, gloo on the CPU) see the same
    samples and give the same vectors (Adam's epsilon 1e-4 so the all-reduce's rounding stays
    invisible, as in test_elastic)."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1"}
    flags = ("--learning_rate", "0.001", "--adam_epsilon", "1e-4", "--max_train_steps", "3", "--checkpointing_steps", "0")
    script = str(ROOT / "train_textual_inversion.py")
    runs = {1: [sys.executable, script], 2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                             script]}
    vectors = {}
    for processes, command in runs.items():
        out = tmp_path / f"p{processes}"
        argv = train_argv(tiny_flux_path, training_images, out, *flags, "--train_batch_size", str(2 // processes),
                          initializer="a red tree", off=("validation", "report", "save"))
        done = subprocess.run([*command, *argv], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        vectors[processes] = load_embedding(out / "my-thing.safetensors").vectors
    for key in ("clip_l", "t5"):
        assert torch.allclose(vectors[1][key], vectors[2][key], atol=1e-6, rtol=0), key


def test_loss_masks_weigh_the_flow_loss(tiny_sd3_path, training_images, tmp_path):
    """Masks reach the flow-matching loss: left-half masks change what trains, and the same masks
    with --unmasked_weight 1 (every pixel weighs 1) train exactly as no masks."""
    from PIL import Image

    masked = tmp_path / "masked"
    shutil.copytree(training_images, masked)
    for image in list(masked.glob("*.png")):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        mask.save(masked / f"{image.stem}-masklabel.png")
    trained = {}
    for name, data, extra in (("plain", training_images, ()), ("masked", masked, ()),
                              ("weight-1", masked, ("--unmasked_weight", "1"))):
        args = parse_args(_argv(tiny_sd3_path, data, tmp_path / name, "--max_train_steps", "2", "--learning_rate",
                                "0.05", *extra))
        assert run_training(args, TextualInversionTask(args)) == 0
        trained[name] = load_embedding(tmp_path / name / "my-thing.safetensors").vectors
    assert all(torch.equal(trained["plain"][key], trained["weight-1"][key]) for key in trained["plain"])
    assert not torch.equal(trained["plain"]["clip_g"], trained["masked"]["clip_g"])


def test_a_shorter_t5_prompt_trains_and_draws_as_diffusers_does(tiny_flux_path, training_images, tmp_path):
    """`--max_sequence_length 16`: the run's prompts have 16 T5 ids, and the file loaded in
    diffusers with the same `max_sequence_length` gives the same embeds and the same image."""
    args = parse_args(_argv(tiny_flux_path, training_images, tmp_path, "--max_sequence_length", "16",
                            "--max_train_steps", "2", "--learning_rate", "0.05"))
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    embedding = load_embedding(tmp_path / "my-thing.safetensors")
    assert task.prompt_encoder.encode(["a photo of my-thing"], {"my-thing": embedding}).embeds.shape[1] == 16
    pipe, _ = load_base_model(tiny_flux_path)
    encoder = PromptEncoder.from_pipeline(pipe, t5_length=16)
    ours = encoder.encode(["a photo of my-thing"], {"my-thing": embedding})
    state = load_file(tmp_path / "my-thing.safetensors")
    tokens = ["<m0>", "<m1>"]
    pipe.load_textual_inversion(state["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["t5"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    embeds, _, _ = pipe.encode_prompt(["a photo of <m0> <m1>"], prompt_2=None, max_sequence_length=16)
    assert ours.embeds.shape[1] == 16 and torch.equal(ours.embeds, embeds)
    drawn = generate(pipe, "a photo of my-thing", seed=3, steps=2, cfg_scale=3.5, width=64, height=64,
                     embeddings={"my-thing": embedding}, encoder=encoder).images[0]
    theirs = pipe("a photo of <m0> <m1>", num_inference_steps=2, guidance_scale=3.5, width=64, height=64,
                  max_sequence_length=16, generator=torch.Generator().manual_seed(3)).images[0]
    assert numpy.array_equal(numpy.asarray(drawn), numpy.asarray(theirs))


@pytest.mark.parametrize(("model", "length", "message"), [
    ("sd1", "16", "--max_sequence_length sets a T5 prompt's length; this SD1 model has no T5 encoder"),
    ("flux", "2", "--max_sequence_length must hold the 2 vector(s) and the end token, at most 512: 3-512, not 2"),
    ("flux", "513", "3-512, not 513"),
])
def test_a_t5_length_that_cannot_be_used_is_refused_before_loading(model, length, message, request,
                                                                    training_images, tmp_path, capsys):
    from tinv_lib.models.loading import save_model_config

    configs_only = save_model_config(request.getfixturevalue(f"tiny_{model}_path"), tmp_path / "configs")
    code = main(_argv(configs_only, training_images, tmp_path / "out", "--max_sequence_length", length))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_leaves_t5_without_dropout(tiny_flux_path):
    """Checkpointing needs training mode; T5's dropout (0.1) must still stay off, or the same
    prompt would encode differently at every step."""
    from tinv_lib.training.frozen_model import load_frozen_model

    family, _ = load_frozen_model(str(tiny_flux_path), None, torch.device("cpu"), torch.float32, True)
    assert all(any(layer.training for layer in encoder.modules()) for encoder in family.text_encoders)
    encoder = PromptEncoder.from_family(family)
    first, again = (encoder.encode(PROMPTS[:1]).embeds for _ in range(2))
    pipe, _ = load_base_model(tiny_flux_path)
    inference = PromptEncoder.from_pipeline(pipe).encode(PROMPTS[:1]).embeds
    assert torch.equal(first, again)  # dropout would differ by ~10% of the values, at random
    assert torch.allclose(first, inference, atol=1e-3)  # the checkpointed layers round a little differently
