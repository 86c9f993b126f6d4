"""The benchmark's models and data: presets, the model built from a preset, the training images.

A preset is an SD 1.x or SDXL topology at some size, an image size and a batch size; its model
is built from config with random weights (deterministic from the seed), saved once as a
diffusers folder and reused by later runs, so every worker and every round loads the same files
the trainers would load from a real model. The images are drawn shapes captioned the A1111
ways (file name, `.txt` sidecar), so the trainers' data path is the real one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CLIP_VOCAB = 49408  # the real CLIP vocabulary: the size a full-matrix trainer would optimise


@dataclass(frozen=True)
class Preset:
    """A model (built from config with random weights), an image size and a batch size."""

    name: str
    arch: str  # "sd1" | "sdxl"
    resolution: int
    batch: int
    unet: dict
    text_encoders: tuple[dict, ...]  # CLIPTextConfig fields; the SDXL second one has a projection
    vae: dict
    about: str


def _sd1_unet(channels: tuple[int, ...], cross: int, heads: int) -> dict:
    """SD 1.x UNet topology: three cross-attention levels and a plain one, two layers each."""
    return dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=cross, attention_head_dim=heads, norm_num_groups=32,
    )


def _sdxl_unet(channels: tuple[int, ...], heads: tuple[int, ...], depth: tuple[int, ...], cross: int,
               time_dim: int, pooled: int) -> dict:
    """SDXL UNet topology: no attention at the top level, deep transformers at the bottom,
    pooled text and size ids as added conditioning."""
    return dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=heads, transformer_layers_per_block=depth, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled, cross_attention_dim=cross,
        norm_num_groups=32,
    )


def _clip(width: int, layers: int, heads: int, act: str = "quick_gelu", projection: bool = False) -> dict:
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                hidden_act=act, projection_dim=width, with_projection=projection)


def _vae(channels: tuple[int, ...], layers: int, scaling: float) -> dict:
    return dict(block_out_channels=channels, layers_per_block=layers, scaling_factor=scaling)


PRESETS = {
    "micro": Preset(
        "micro", "sd1", 64, 2, _sd1_unet((32, 32, 32, 32), 32, 4), (_clip(32, 2, 2),), _vae((32,) * 4, 1, 0.18215),
        "smoke-test size: SD 1.x topology at width 32",
    ),
    "bench": Preset(
        "bench", "sd1", 64, 4, _sd1_unet((64, 128, 256, 256), 256, 8), (_clip(256, 4, 4),),
        _vae((32, 64, 64, 64), 2, 0.18215),
        "SD 1.5 topology scaled down for 2 CPU cores: UNet 64/128/256/256, 4-layer 256-wide CLIP",
    ),
    "sdxl-bench": Preset(
        "sdxl-bench", "sdxl", 64, 4, _sdxl_unet((64, 128, 256), (1, 2, 4), (1, 2, 10), 256 + 384, 32, 384),
        (_clip(256, 4, 4), _clip(384, 4, 6, act="gelu", projection=True)), _vae((32, 64, 64, 64), 2, 0.13025),
        "SDXL topology scaled down: UNet 64/128/256 with 1/2/10 transformer layers, CLIP 256 + 384",
    ),
    "sd15": Preset(
        "sd15", "sd1", 512, 4, _sd1_unet((320, 640, 1280, 1280), 768, 8), (_clip(768, 12, 12),),
        _vae((128, 256, 512, 512), 2, 0.18215),
        "SD 1.5 architecture (UNet 860M, CLIP ViT-L/14 text) with random weights",
    ),
    "sdxl": Preset(
        "sdxl", "sdxl", 1024, 2, _sdxl_unet((320, 640, 1280), (5, 10, 20), (1, 2, 10), 2048, 256, 1280),
        (_clip(768, 12, 12), _clip(1280, 32, 20, act="gelu", projection=True)), _vae((128, 256, 512, 512), 2, 0.13025),
        "SDXL base architecture (UNet 2.6B, CLIP-L + OpenCLIP bigG) with random weights",
    ),
}


def build_pipeline(preset: Preset, seed: int, workdir: Path):
    """The preset's pipeline from config, weights deterministic from `seed`, made of the same
    parts as `testing.tiny`'s (its VAE, CLIP text encoder and pipeline assembly) at the
    preset's sizes. The text encoders have the real CLIP vocabulary size (49408 rows), so the
    bytes a full-matrix trainer would hold are the real ones; our tokenizer uses the first few
    hundred."""
    from diffusers import UNet2DConditionModel

    from testing.tiny import assemble_pipeline, make_text_encoder, make_vae
    from testing.tokenizer_build import END_TOKEN, build_clip_tokenizer

    torch.manual_seed(seed)
    latent = preset.resolution // 2 ** (len(preset.vae["block_out_channels"]) - 1)
    vae = make_vae(sample_size=preset.resolution, **preset.vae)
    unet = UNet2DConditionModel(sample_size=latent, **preset.unet)
    pads = [END_TOKEN, "!"][:len(preset.text_encoders)]  # SDXL's second tokenizer pads with "!"
    tokenizers = [build_clip_tokenizer(workdir / name, pad_token=pad)
                  for name, pad in zip(("tokenizer-build", "tokenizer-2-build"), pads)]
    text_encoders = [
        make_text_encoder(tokenizer, spec["hidden_size"], spec["with_projection"], spec["hidden_act"],
                          layers=spec["num_hidden_layers"], heads=spec["num_attention_heads"],
                          intermediate=spec["intermediate_size"], vocab_size=max(CLIP_VOCAB, len(tokenizer)))
        for tokenizer, spec in zip(tokenizers, preset.text_encoders)
    ]
    return assemble_pipeline(preset.arch, vae, unet, text_encoders, tokenizers)


def prepare_model(preset: Preset, seed: int, workdir: Path) -> Path:
    """Save the preset's pipeline as a diffusers folder once; later runs reuse it."""
    folder = workdir / f"model-{preset.name}-{preset.resolution}-seed{seed}"
    stamp = folder / "bench-preset.json"
    wanted = json.dumps(asdict(preset), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder
    pipe = build_pipeline(preset, seed, workdir)
    pipe.save_pretrained(folder, safe_serialization=True)
    stamp.write_text(wanted)
    return folder


def prepare_images(folder: Path, count: int, resolution: int) -> Path:
    """`count` drawn images at the training size, captioned by file name (A1111 style) or by
    `.txt` sidecar, so the trainers' data path (captions, templates) is the real one."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "pink"]
    shapes = ["circle", "square"]
    for index in range(count):
        colour, shape = colours[index % len(colours)], shapes[index % len(shapes)]
        stem = f"{index:05d}-0-a {colour} {shape}"
        if (folder / f"{stem}.png").is_file():
            continue
        image = Image.new("RGB", (resolution, resolution), "white")
        edge = resolution // 5 + index
        box = [edge, edge, resolution - edge // 2, resolution - edge]
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colour)
        image.save(folder / f"{stem}.png")
        if index % 2:
            (folder / f"{stem}.txt").write_text(f"{colour}, {shape}, white background", encoding="utf-8")
    return folder
