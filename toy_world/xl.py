"""The SDXL-layout toy model: two CLIP text encoders, the pooled text and the size ids.

The same world, VAE and judge as the SD 1.x toy model (`models/toy`), and the same training
(`diffusion.train_diffusion`), with SDXL's text side and UNet conditioning, small:

* `text_encoder` (clip_l): `CLIPTextModel`, width 64, quick_gelu, its tokenizer pads with
  `<|endoftext|>`; `text_encoder_2` (clip_g): `CLIPTextModelWithProjection`, width 96, gelu,
  its tokenizer pads with `!`. Both have 4 layers, so the penultimate layer that SDXL reads is
  the third.
* The context is both penultimate hidden states side by side (64 + 96 = 160 wide, none of the
  UNet's channel widths); the pooled text is the second encoder's projection of its end token.
* The UNet adds SDXL's `text_time` embedding: pooled text plus the (original size, crop, target
  size) ids, always (64, 64, 0, 0, 64, 64) here, as the pipeline sends at 64 px.
* A dropped caption (classifier-free guidance) is a zero context and zero pooled text, as SDXL
  was trained, which is why its pipelines zero an empty negative prompt
  (`force_zeros_for_empty_prompt`).
* Scheduler: SDXL's Euler with "leading" spacing, on the toy betas and v target
  (`diffusion.TOY_BETAS`, `diffusion.TOY_PREDICTION`, where the departure from SD is explained).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from toy_world.diffusion import TOY_BETAS, TOY_PREDICTION, UNET_CONFIG, CaptionTokens

CLIP_L_WIDTH = 64
CLIP_G_WIDTH = 96
TEXT_LAYERS = 4
IMAGE_SIZE = 64
TIME_EMBED_DIM = 16  # SDXL: 256 per id

# The SD 1.x toy UNet (same levels and channels) with SDXL's conditioning and attention layout.
XL_UNET_CONFIG = {
    **UNET_CONFIG,
    "transformer_layers_per_block": (1, 1, 2),  # deeper at the coarsest level, as SDXL's (1, 2, 10)
    "attention_head_dim": (2, 4, 8),  # heads per level (diffusers' SDXL configs use the name so)
    "use_linear_projection": True,
    "cross_attention_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": CLIP_G_WIDTH + 6 * TIME_EMBED_DIM,
}


def build_text_encoders(tokenizer, tokenizer_2) -> list:
    """Fresh clip_l and clip_g encoders (random weights from the torch seed)."""
    from testing.tiny import make_text_encoder

    clip_l = make_text_encoder(tokenizer, CLIP_L_WIDTH, layers=TEXT_LAYERS, intermediate=CLIP_L_WIDTH * 4)
    clip_g = make_text_encoder(tokenizer_2, CLIP_G_WIDTH, with_projection=True, act="gelu", layers=TEXT_LAYERS,
                               intermediate=CLIP_G_WIDTH * 4)
    return [clip_l, clip_g]


def build_unet():
    """A fresh SDXL-layout UNet (random weights from the torch seed)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**XL_UNET_CONFIG)


class XlText:
    """SDXL's text side for `diffusion.train_diffusion`: context, pooled text and size ids."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[torch.nn.Module]) -> None:
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.tokens = [CaptionTokens(tokenizer) for tokenizer in tokenizers]

    def condition(self, captions: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """Penultimate states of both encoders side by side, and the `text_time` inputs; zeros
        for an empty caption."""
        outputs = [encoder(tokens(captions), output_hidden_states=True)
                   for encoder, tokens in zip(self.encoders, self.tokens)]
        context = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        pooled = outputs[1].text_embeds
        kept = torch.tensor([caption != "" for caption in captions], dtype=context.dtype)
        size_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * len(captions),
                                dtype=context.dtype)
        extra = {"added_cond_kwargs": {"text_embeds": pooled * kept[:, None], "time_ids": size_ids}}
        return context * kept[:, None, None], extra


def xl_scheduler():
    """SDXL's inference scheduler (Euler, "leading" spacing, as in SDXL base's folder) on the toy
    betas and v target."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**TOY_BETAS, prediction_type=TOY_PREDICTION, steps_offset=1,
                                  timestep_spacing="leading")


def assemble_xl_pipeline(vae, text_encoders: Sequence, tokenizers: Sequence, unet):
    """The parts as a StableDiffusionXLPipeline (CPU, float32, no watermarker, progress bar off)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=xl_scheduler(), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
