"""The SDXL-layout toy model (`models/toy-xl`): SDXL-shaped, small, on the SD 1.x model's VAE and
judge, follows prompts; its recipe runs in --quick mode and repeats bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from toy_world.pipeline import DEFAULT_MODEL_DIR, XL_MODEL_DIR
from toy_world.scoring import load_default_judge


@pytest.fixture(scope="module")
def pipe():
    from tinv_lib.models.loading import load_base_model

    pipe, info = load_base_model(XL_MODEL_DIR)
    assert info.arch == "sdxl" and info.prediction_type == "v_prediction"
    return pipe


def test_model_folder_is_small_sdxl_shaped_and_shares_the_vae_and_judge():
    files = [p for p in XL_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    index = json.loads((XL_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"][1] == "EulerDiscreteScheduler" and index["force_zeros_for_empty_prompt"] is True
    unet = json.loads((XL_MODEL_DIR / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 64 + 96
    for shared in ("vae/diffusion_pytorch_model.safetensors", "judge/judge.safetensors"):
        assert (XL_MODEL_DIR / shared).read_bytes() == (DEFAULT_MODEL_DIR / shared).read_bytes(), shared


def test_base_model_follows_prompts(pipe):
    from benchmarks import quality

    # A regression guard for the committed model; the bar of 80% over 64 prompts is
    # measured by benchmarks/quality.py (docs/toy_world.md, "The SDXL toy model").
    result = quality.measure_prompt_following(pipe, load_default_judge(XL_MODEL_DIR), count=8, seed=1, steps=20)
    assert result["n"] == 8 and result["match"] >= 0.5, result["seen"]


def test_recipe_defaults_are_the_committed_model():
    from recipes import pretrain_toy_model
    from toy_world.recipe import REPORT_NAME

    cfg = pretrain_toy_model.config_from_args(pretrain_toy_model.parse_args(["--architecture", "sdxl"]))
    assert cfg.output_dir == XL_MODEL_DIR and cfg.base_model == DEFAULT_MODEL_DIR
    committed = json.loads((XL_MODEL_DIR / REPORT_NAME).read_text())["config"]
    settings = dataclasses.asdict(cfg)
    for key, value in committed.items():
        if key not in ("output_dir", "work_dir", "base_model"):
            assert settings[key] == value, key


def test_recipe_quick_mode_writes_an_sdxl_pipeline_that_repeats_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from tinv_lib.models.loading import load_base_model
    from toy_world.recipe import quick_config, run_recipe

    def run(name: str) -> dict[str, torch.Tensor]:
        cfg = dataclasses.replace(quick_config(tmp_path / name, tmp_path / f"{name}-work"), architecture="sdxl")
        report = run_recipe(cfg, log=lambda message: None)
        assert set(report["timing"]["stages"]) == {"data", "vae", "diffusion"}
        return {f"{f.parent.name}/{key}": tensor
                for f in sorted((tmp_path / name).rglob("*.safetensors")) for key, tensor in load_file(f).items()}

    first, again = run("first"), run("again")
    assert {name.split("/")[0] for name in first} == {"judge", "text_encoder", "text_encoder_2", "unet", "vae"}
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)
    pipe, info = load_base_model(tmp_path / "first")
    assert info.arch == "sdxl" and pipe.text_encoder_2.config.projection_dim == 96
