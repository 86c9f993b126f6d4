"""Single-file FLUX.1 and SD3 checkpoints (issue 33): the layouts real files have load with
`--model_config` to the folder's weights bit for bit, read as diffusers reads them, and train;
files that cannot be read are refused in one line."""

from __future__ import annotations

import pytest
import torch
from helpers import run_training, train_argv
from safetensors.torch import load_file, save_file

from testing.flow_single_file import flow_single_file_state, write_flow_single_file
from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.models.architecture import ModelLoadError
from tinv_lib.models.loading import load_base_model, save_model_config
from tinv_lib.training.textual_inversion import TextualInversionTask, main, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")
T5_TIED = "encoder.embed_tokens.weight"  # T5's input embedding, stored once in files as `shared.weight`


@pytest.fixture(params=["flux", "sd3"])
def flow_folder(request):
    return request.getfixturevalue(f"tiny_{request.param}_path")


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def _differing(ours, theirs, skip=()) -> list[str]:
    mine, other = _weights(ours), _weights(theirs)
    assert mine.keys() == other.keys()
    return [key for key in mine if key not in skip and (other[key].is_meta or not torch.equal(mine[key], other[key]))]


@pytest.mark.parametrize("kind", ["all-in-one", "transformer-only"])
def test_single_files_load_to_the_folders_weights_bit_for_bit(flow_folder, kind, tmp_path):
    folder_pipe, folder_info = load_base_model(flow_folder)
    single = write_flow_single_file(folder_pipe, tmp_path / "model.safetensors", kind)
    pipe, info = load_base_model(single, model_config=flow_folder)
    assert type(pipe) is type(folder_pipe) and info.arch == folder_info.arch and info.path == single
    differing = _differing(pipe, folder_pipe)
    if info.arch == "sd3" and kind == "all-in-one":
        # SD3 pools CLIP-L unprojected: its files hold no projection, read as identity (as diffusers does)
        assert differing == ["text_encoder.text_projection.weight"]
        assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(32))
    else:
        assert differing == []
    t5 = pipe.text_encoder_3 if info.arch == "sd3" else pipe.text_encoder_2
    assert t5.encoder.embed_tokens.weight is t5.shared.weight  # tied again after loading
    assert all(not value.is_meta and value.dtype == torch.float32 for value in _weights(pipe).values())


def test_the_files_read_as_diffusers_reads_them(tiny_flux_path, tiny_sd3_path, tmp_path):
    """The layout is diffusers' too, not only tinv's idea of it: diffusers 0.42.1 reads the SD3 file
    whole, and the FLUX.1 file's VAE and text encoders (its FLUX.1 transformer reader assumes the
    real width, 3072: checked below with the fused rows padded to it). diffusers leaves T5's tied
    input embedding unread (on the meta device) when a file stores it once, as real files do."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd3 = write_flow_single_file(load_base_model(tiny_sd3_path)[0], tmp_path / "sd3.safetensors")
    theirs = StableDiffusion3Pipeline.from_single_file(str(sd3), config=str(tiny_sd3_path), local_files_only=True)
    assert _differing(load_base_model(sd3, tiny_sd3_path)[0], theirs, skip={f"text_encoder_3.{T5_TIED}"}) == []

    flux_pipe = load_base_model(tiny_flux_path)[0]
    flux = write_flow_single_file(flux_pipe, tmp_path / "flux.safetensors")
    ours = load_base_model(flux, tiny_flux_path)[0]
    theirs = FluxPipeline.from_single_file(str(flux), config=str(tiny_flux_path), local_files_only=True,
                                           transformer=ours.transformer)
    assert _differing(ours, theirs, skip={f"text_encoder_2.{T5_TIED}"}) == []

    prefix = "model.diffusion_model."
    state = {key.removeprefix(prefix): value for key, value in load_file(flux).items() if key.startswith(prefix)}
    inner, mlp = 16, 64  # the tiny model's width and MLP width; the real model's are 3072 and 12288
    for key in [key for key in state if ".linear1." in key]:
        parts = torch.split(state[key], (inner, inner, inner, mlp))
        state[key] = torch.cat([torch.cat([part, part.new_zeros(real - len(part), *part.shape[1:])])
                                for part, real in zip(parts, (3072, 3072, 3072, 12288))])
    converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    reference = flux_pipe.transformer.state_dict()
    assert converted.keys() == reference.keys()
    assert all(torch.equal(value, converted[key][: len(value)]) for key, value in reference.items())


def test_textual_inversion_trains_on_a_single_file(flow_folder, training_images, tmp_path):
    folder_pipe = load_base_model(flow_folder)[0]
    single = write_flow_single_file(folder_pipe, tmp_path / "model.safetensors")
    argv = train_argv(single, training_images, tmp_path / "out", "--model_config", str(flow_folder),
                      "--max_train_steps", "2", "--learning_rate", "0.05", initializer="a red tree",
                      off=("validation", "report"))
    args = parse_args(argv)
    task = TextualInversionTask(args)
    assert run_training(args, task) == 0
    saved = load_embedding(tmp_path / "out" / "my-thing.safetensors")
    keys = task.family.architecture.embedding_keys
    assert list(saved.vectors) == list(keys) and saved.step == 2
    assert all((saved.vectors[key] - task.initial[key]).abs().max() > 1e-4 for key in keys)
    assert saved.sd_checkpoint_name == "model"  # the file's name, as A1111 records it


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_files_that_cannot_be_read_are_refused_in_one_line(tiny_flux_path, tiny_sd3_path, tmp_path):
    flux_pipe = load_base_model(tiny_flux_path)[0]
    transformer_only = write_flow_single_file(flux_pipe, tmp_path / "flux1-dev.safetensors", "transformer-only")
    configs_only = save_model_config(tiny_flux_path, tmp_path / "configs")
    with pytest.raises(ModelLoadError) as caught:
        load_base_model(transformer_only, configs_only)
    assert _one_line(caught).endswith("flux1-dev.safetensors holds no text_encoder weights and "
                                      f"{configs_only / 'text_encoder'} has none either: pass --model_config a "
                                      "FluxPipeline folder with text_encoder weights (only the parts the file "
                                      "lacks are read)")

    state = flow_single_file_state(flux_pipe)
    del state["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    save_file(state, tmp_path / "truncated.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_base_model(tmp_path / "truncated.safetensors", tiny_flux_path)
    assert _one_line(caught).endswith("truncated.safetensors (transformer): 1 tensors missing, "
                                      "e.g. 'model.diffusion_model.double_blocks.0.img_attn.qkv.weight'")

    state = flow_single_file_state(flux_pipe)
    state["vae.decoder.conv_in.weight"] = state["vae.decoder.conv_in.weight"][:, :8].contiguous()
    save_file(state, tmp_path / "narrow.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_base_model(tmp_path / "narrow.safetensors", tiny_flux_path)
    assert f"narrow.safetensors (vae): does not fit {tiny_flux_path / 'vae'}: size mismatch for " \
           "decoder.conv_in.weight" in _one_line(caught)

    with pytest.raises(ModelLoadError) as caught:
        load_base_model(write_flow_single_file(flux_pipe, tmp_path / "f.safetensors"), tiny_sd3_path)
    assert _one_line(caught).endswith(f"the weights are FLUX but {tiny_sd3_path} is a SD3 config")

    with pytest.raises(ModelLoadError) as caught:
        load_base_model(tmp_path / "f.safetensors")
    assert "a single-file FLUX checkpoint needs --model_config DIR" in _one_line(caught)


def test_a_dev_file_with_a_schnell_config_is_refused(tiny_flux_path, tmp_path):
    from testing.tiny import save_tiny_pipeline

    schnell = save_tiny_pipeline("flux-schnell", tmp_path / "schnell")
    dev_file = write_flow_single_file(load_base_model(tiny_flux_path)[0], tmp_path / "dev.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_base_model(dev_file, schnell)
    assert "(transformer): 4 tensors have no place in the --model_config transformer" in _one_line(caught)
    assert "FLUX.1-dev and schnell differ" in _one_line(caught)


def test_the_trainer_refuses_an_unreadable_file_in_one_line_before_training(tiny_flux_path, training_images,
                                                                             tmp_path, capsys):
    single = write_flow_single_file(load_base_model(tiny_flux_path)[0], tmp_path / "flux1-dev.safetensors",
                                    "transformer-only")
    configs_only = save_model_config(tiny_flux_path, tmp_path / "configs")
    code = main(train_argv(single, training_images, tmp_path / "out", "--model_config", str(configs_only),
                           "--max_train_steps", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "holds no text_encoder weights" in err[-1], err
    assert not (tmp_path / "out" / "my-thing.safetensors").exists()


def test_sd35_transformer_options_read_as_diffusers_reads_them():
    """SD3.5's transformer options the tiny SD3 lacks: RMS q/k norms (large, medium), a second
    attention in the first blocks (medium), several blocks (the last one reads text only)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from tinv_lib.models import checkpoint_layout as layout

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=24, out_channels=16, pos_embed_max_size=16,
                                  qk_norm="rms_norm", dual_attention_layers=(0, 1))
    reference = model.state_dict()
    rules = layout.sd3_rules({key: value.shape for key, value in reference.items()})
    original = layout.to_original(rules, reference)
    assert any(".attn2.ln_q." in key for key in original) and any(".attn.ln_k." in key for key in original)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == reference.keys()
    assert all(torch.equal(value, converted[key]) for key, value in reference.items())
    assert all(torch.equal(value, reference[key]) for key, value in layout.from_original(rules, original, "t").items())


def test_generate_draws_from_a_single_file_with_the_models_own_sampler(tiny_flux_path, tmp_path, capsys):
    """The config folder says what the file is before it loads: Euler is the default, and a
    sampler FLUX.1 lacks is refused in one line without reading the file."""
    from PIL import Image

    from tinv_lib.generation.cli import main as generate_main

    single = write_flow_single_file(load_base_model(tiny_flux_path)[0], tmp_path / "flux1-dev.safetensors",
                                    "transformer-only")
    argv = ["--pretrained_model_name_or_path", str(single), "--model_config", str(tiny_flux_path), "--prompt",
            "a photo", "--width", "64", "--height", "64", "--steps", "2", "--seed", "5", "--no_date_dirs"]
    assert generate_main([*argv, "--outdir", str(tmp_path / "out")]) == 0
    (saved,) = (tmp_path / "out").glob("*.png")
    assert "Sampler: Euler," in Image.open(saved).info["parameters"]
    capsys.readouterr()
    (tmp_path / "broken.safetensors").write_bytes(b"not a model")  # never read: refused first
    code = generate_main([*argv[:1], str(tmp_path / "broken.safetensors"), *argv[2:], "--sampler", "DPM++ 2M",
                          "--outdir", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: sampler 'DPM++ 2M' does not exist for flow-matching"), err


def test_hypernetworks_on_a_single_file_are_refused_before_it_loads(tiny_flux_path, training_images, tmp_path,
                                                                    capsys):
    from tinv_lib.generation.cli import main as generate_main
    from tinv_lib.training.hypernetwork import main as hypernetwork_main

    never_read = tmp_path / "flux1-dev.safetensors"
    never_read.write_bytes(b"not a model")
    configs = str(save_model_config(tiny_flux_path, tmp_path / "configs"))
    code = hypernetwork_main(["--pretrained_model_name_or_path", str(never_read), "--model_config", configs,
                              "--train_data_dir", str(training_images), "--output_dir", str(tmp_path / "hn"),
                              "--hypernetwork_name", "hn", "--resolution", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: {never_read}: hypernetworks act on a UNet's cross-attention")
    code = generate_main(["--pretrained_model_name_or_path", str(never_read), "--model_config", configs,
                          "--prompt", "a photo <hypernet:x:1>", "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "FLUX model is a transformer" in err[0]
