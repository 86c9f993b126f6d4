"""The FLUX.1-layout toy model: CLIP-L's pooled text, T5's sequence, a rectified-flow transformer.

The same world, VAE and judge as the SD 1.x toy model (`models/toy`), and the same joint training
loop (`diffusion.train_diffusion`), with FLUX.1's text side, denoiser and objective, small:

* `text_encoder` (clip_l): `CLIPTextModel`, width 64, 4 layers, padded with `<|endoftext|>` to 77
  as FLUX.1's; only its pooled output (the end token's state) reaches the transformer, through
  the blocks' modulation, never as a sequence.
* `text_encoder_2` (t5): `T5EncoderModel` (gated GELU, relative positions, as T5 v1.1 / T5-XXL),
  width 96, 3 layers, no dropout, on a Unigram tokenizer made in code
  (`testing.tiny_flow.build_t5_tokenizer`: every caption word is one piece). Its last hidden
  state is the transformer's text sequence.
* T5 prompts are `T5_LENGTH` (32) tokens, saved as the T5 tokenizer's `model_max_length`: the
  longest caption is 17, and FLUX.1 attends to every padding token, so the model is only right
  at the length it was trained at. tinv reads the length from there (`--max_sequence_length`
  defaults to it); diffusers' own pipeline must be given `max_sequence_length=32`.
* The transformer: `FluxTransformer2DModel` with 2 double-stream and 4 single-stream blocks,
  4 heads of 32, on the toy VAE's 16x16x4 latents packed into 2x2 patches (64 image tokens of
  16 channels).
* No guidance embedding (FLUX.1-schnell's layout). FLUX.1-dev's embedding is learnt by
  distilling classifier-free guidance from a teacher; this model is trained with dropped
  captions instead and sampled with true classifier-free guidance (diffusers' `true_cfg_scale`,
  tinv's `--cfg_scale`).
* Objective: tinv's own flow-matching objective (`tinv_lib.models.flow`): logit-normal noise
  levels shifted as the scheduler shifts its sampling steps, velocity target. The scheduler is
  FLUX.1-dev's resolution-dependent shift (0.5 to 1.15 in log space) scaled to the toy's token
  counts (4 to 64), so a 64 px image is shifted as FLUX.1-dev shifts a 1024 px one (3.16).
* The VAE is `models/toy`'s, byte for byte in its weights; its config gains `shift_factor` 0.0,
  which FLUX.1 pipelines subtract before scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinv_lib.models import flow
from toy_world.diffusion import CaptionTokens

CLIP_WIDTH = 64
T5_WIDTH = 96
T5_LAYERS = 3
T5_LENGTH = 32

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # the toy VAE's 4 latent channels, 2x2-packed
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": T5_WIDTH,
    "pooled_projection_dim": CLIP_WIDTH,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),  # (text/index, row, column), summing to the head width
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 4,
    "max_image_seq_len": 64,
}


def build_tokenizers(work_dir):
    """The CLIP tokenizer (saved under `work_dir`) and the T5 tokenizer, both made in code."""
    from testing.tiny_flow import build_t5_tokenizer
    from testing.tokenizer_build import END_TOKEN, build_clip_tokenizer

    t5 = build_t5_tokenizer()
    t5.model_max_length = T5_LENGTH
    return build_clip_tokenizer(work_dir / "tokenizer", pad_token=END_TOKEN), t5


def build_text_encoders(tokenizer, tokenizer_2) -> list:
    """Fresh clip_l and t5 encoders (random weights from the torch seed)."""
    from transformers import T5Config, T5EncoderModel

    from testing.tiny import make_text_encoder

    clip_l = make_text_encoder(tokenizer, CLIP_WIDTH, layers=4, intermediate=CLIP_WIDTH * 4)
    config = T5Config(vocab_size=len(tokenizer_2), d_model=T5_WIDTH, d_kv=24, d_ff=T5_WIDTH * 2,
                      num_layers=T5_LAYERS, num_heads=4, relative_attention_num_buckets=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return [clip_l, T5EncoderModel(config)]


def build_transformer():
    """A fresh FLUX.1-layout transformer (random weights from the torch seed)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def build_scheduler():
    """The toy's FlowMatchEulerDiscreteScheduler (`SCHEDULER_CONFIG`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


class FluxText:
    """FLUX.1's text side for `diffusion.train_diffusion`: T5's sequence and CLIP-L's pooled text.

    A dropped caption is the empty prompt encoded (FLUX.1 pipelines encode an empty negative
    prompt; nothing is zeroed)."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[torch.nn.Module]) -> None:
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.tokens = [CaptionTokens(tokenizer) for tokenizer in tokenizers]

    def condition(self, captions: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """T5's last hidden states, and `pooled_projections`: CLIP-L's pooled output."""
        pooled = self.encoders[0](self.tokens[0](captions)).pooler_output
        sequence = self.encoders[1](self.tokens[1](captions)).last_hidden_state
        return sequence, {"pooled_projections": pooled}


def flow_loss(transformer, text, latents: torch.Tensor, captions: Sequence[str], scheduler, cfg,
              generator: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
    """The flow-matching loss of one batch of scaled latents (or of its `part`): the mean squared
    error of the predicted velocity, at noise levels drawn as tinv's trainer draws them.

    Noise and timesteps are drawn for the whole batch either way, so processes that share a
    batch draw the same numbers and each trains on its part (as `diffusion.diffusion_loss`)."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    latents, noise, timesteps = latents[part], noise[part], timesteps[part]
    height, width = latents.shape[-2:]
    sigmas = flow.noise_levels(timesteps, scheduler.config, (height // 2) * (width // 2))
    noisy = (1.0 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
    sequence, extra = text.condition(captions[part])
    prediction = flow.flux_forward(transformer, noisy, sigmas, sequence, extra["pooled_projections"], torch.float32)
    return ((prediction - (noise - latents)) ** 2).mean()


def flux_vae(vae):
    """`vae` as FLUX.1 pipelines read it: the same weights with `shift_factor` 0.0."""
    vae.register_to_config(shift_factor=0.0)
    return vae


def assemble_flux_pipeline(vae, text_encoders: Sequence, tokenizers: Sequence, transformer):
    """The parts as a FluxPipeline (CPU, float32, progress bar off)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=build_scheduler(), vae=flux_vae(vae), text_encoder=text_encoders[0], tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1], transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
