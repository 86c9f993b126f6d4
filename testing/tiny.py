"""Tiny Stable Diffusion pipelines built from config in code: SD1, SD2 (v-prediction) and SDXL.

Used by the tests and by anyone without a real model. Nothing is downloaded: the tokenizer is
made by `testing.tokenizer_build`, the weights are random but deterministic from a seed. The
components have the real classes and folder layout, so every code path (training, file formats,
single-file loading, generation) runs on them as on a real model, in seconds on a CPU.

Widths are chosen to differ between architectures so wrong-width tests mean something:
SD1 text width 32, SD2 48, SDXL clip_l 32 + clip_g 48 (UNet cross-attention 80).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from testing.tokenizer_build import END_TOKEN, build_clip_tokenizer

ARCHITECTURES = ("sd1", "sd2-v", "sdxl")

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def make_vae(scaling_factor: float, block_out_channels: tuple[int, ...] = (32, 32, 32, 32), layers_per_block: int = 1,
             sample_size: int = 64):
    """An SD VAE (four levels, 4 latent channels) with random weights; the defaults are the tiny one."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=layers_per_block,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def make_text_encoder(tokenizer, width: int, with_projection: bool = False, act: str = "quick_gelu", *,
                      layers: int = 4, heads: int = 4, intermediate: int | None = None, vocab_size: int | None = None):
    """A CLIP text encoder for `tokenizer` with random weights; the defaults are the tiny one
    (4 layers, 4 heads, MLP twice the width, the tokenizer's own vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        hidden_size=width,
        intermediate_size=width * 2 if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def _sd_unet(cross_attention_dim: int, linear_projection: bool, head_dim):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_dim,
        use_linear_projection=linear_projection,
        norm_num_groups=32,
    )


def _scheduler(arch: str):
    """The noise scheduler of `arch`, with SD's betas."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if arch == "sd1":
        return PNDMScheduler(**_SD_BETAS, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    if arch == "sd2-v":
        return DDIMScheduler(**_SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                             prediction_type="v_prediction")
    return EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")


def assemble_pipeline(arch: str, vae, unet, text_encoders: list, tokenizers: list):
    """The diffusers pipeline of `arch` ("sd1", "sd2-v", "sdxl") around these components, with the
    architecture's scheduler and no safety checker. Builds nothing random."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=_scheduler(arch),
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=_scheduler(arch),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sd1(seed: int, workdir: Path):
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(workdir / "tokenizer", pad_token=END_TOKEN)
    vae = make_vae(0.18215)
    text_encoder = make_text_encoder(tokenizer, 32)
    return assemble_pipeline("sd1", vae, _sd_unet(32, False, 8), [text_encoder], [tokenizer])


def _build_sd2v(seed: int, workdir: Path):
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(workdir / "tokenizer", pad_token="!")
    vae = make_vae(0.18215)
    text_encoder = make_text_encoder(tokenizer, 48, act="gelu")
    return assemble_pipeline("sd2-v", vae, _sd_unet(48, True, (2, 4)), [text_encoder], [tokenizer])


def _build_sdxl(seed: int, workdir: Path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(workdir / "tokenizer", pad_token=END_TOKEN)
    tokenizer_2 = build_clip_tokenizer(workdir / "tokenizer_2", pad_token="!")
    text_encoder = make_text_encoder(tokenizer, 32)
    text_encoder_2 = make_text_encoder(tokenizer_2, 48, with_projection=True, act="gelu")
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 48,
        cross_attention_dim=32 + 48,
        norm_num_groups=32,
    )
    vae = make_vae(0.13025)  # after the UNet, so the seed gives the same weights as always
    return assemble_pipeline("sdxl", vae, unet, [text_encoder, text_encoder_2], [tokenizer, tokenizer_2])


_BUILDERS = {"sd1": _build_sd1, "sd2-v": _build_sd2v, "sdxl": _build_sdxl}


def build_tiny_pipeline(arch: str, seed: int = 0):
    """A tiny diffusers pipeline of architecture `arch`, CPU float32: "sd1", "sd2-v", "sdxl" here,
    "flux-dev", "flux-schnell", "sd3" from `testing.tiny_flow`. The same seed gives bit-identical weights.
    """
    from testing.tiny_flow import FLOW_ARCHITECTURES, build_tiny_flow_pipeline  # it builds on this module

    if arch in FLOW_ARCHITECTURES:
        return build_tiny_flow_pipeline(arch, seed)
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES + FLOW_ARCHITECTURES)}")
    with tempfile.TemporaryDirectory() as workdir:
        pipe = _BUILDERS[arch](seed, Path(workdir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors weights)."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(arch, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m testing.tiny sd1 DIR [--seed N]`: write a tiny model folder."""
    import argparse

    from testing.tiny_flow import FLOW_ARCHITECTURES

    parser = argparse.ArgumentParser(description="Write a tiny random model of any family tinv knows (diffusers folder).")
    parser.add_argument("arch", choices=ARCHITECTURES + FLOW_ARCHITECTURES)
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_pipeline(args.arch, args.folder, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
