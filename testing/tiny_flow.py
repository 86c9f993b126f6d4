"""Tiny FLUX.1 and SD3 pipelines built from config in code: the flow-matching families.

Beside `testing.tiny` (SD1, SD2, SDXL): the same idea, real diffusers/transformers classes with
random weights from a seed, nothing downloaded. What these families add over SDXL is a T5
encoder, whose SentencePiece tokenizer cannot be downloaded here; `build_t5_tokenizer` makes a
genuine Unigram tokenizer in code (the `tokenizers` library) and wraps it in `T5TokenizerFast`,
with every word of `COMMON_WORDS` one piece, so init text means something.

Widths differ between encoders so wrong-width tests mean something:
* FLUX.1: clip_l 32 (pooled only), t5 40; dev has the guidance embedding, schnell has not.
* SD3: clip_l 32 + clip_g 48 (both with projection, pooled 80), t5 96 (SD3 pads the CLIP states
  to T5's width, so T5 must be the widest).
The VAE has 16 latent channels and a `shift_factor`, as both families' VAEs do. Saving one, and
the command line, go through `testing.tiny` (`save_tiny_pipeline("flux-dev", folder)`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from testing.tiny import make_text_encoder
from testing.tokenizer_build import COMMON_WORDS, END_TOKEN, build_clip_tokenizer

FLOW_ARCHITECTURES = ("flux-dev", "flux-schnell", "sd3")
T5_PAD, T5_END, T5_UNKNOWN = "<pad>", "</s>", "<unk>"
WORD_START = "\u2581"  # SentencePiece's word-start mark


def build_t5_tokenizer():
    """A T5-style Unigram tokenizer made in code: `<pad>` 0, `</s>` 1, `<unk>` 2, then one piece
    per common word (with the word-start mark) and single characters for everything else; no
    `</w>`, words split into pieces, `</s>` appended, as T5's SentencePiece model does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    vocab = [(T5_PAD, 0.0), (T5_END, 0.0), (T5_UNKNOWN, 0.0)]
    vocab += [(WORD_START + word, -5.0) for word in sorted(set(COMMON_WORDS))]
    vocab += [(char, -10.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789-_.,<>'!?"]
    vocab += [(WORD_START, -8.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
    tokenizer.post_processor = TemplateProcessing(single=f"$A {T5_END}", special_tokens=[(T5_END, 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token=T5_PAD, eos_token=T5_END, unk_token=T5_UNKNOWN,
                           extra_ids=0, model_max_length=512)


def make_t5_encoder(tokenizer, width: int):
    """A two-layer T5 encoder (gated GELU, as T5 v1.1 / T5-XXL) with random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=width * 2, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def make_flow_vae(scaling_factor: float, shift_factor: float):
    """A 16-channel VAE with four levels (8 pixels per latent cell) and the `shift_factor` that
    FLUX.1 and SD3 pipelines subtract before scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_flux(seed: int, workdir: Path, dev: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(workdir / "tokenizer", pad_token=END_TOKEN)
    tokenizer_2 = build_t5_tokenizer()
    text_encoder = make_text_encoder(tokenizer, 32)
    text_encoder_2 = make_t5_encoder(tokenizer_2, 40)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=32, guidance_embeds=dev,
        axes_dims_rope=(2, 2, 4),
    )
    vae = make_flow_vae(0.3611, 0.1159)
    if dev:  # FLUX.1-dev's scheduler: the shift grows with the image's token count
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell's: no shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def _build_sd3(seed: int, workdir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(workdir / "tokenizer", pad_token=END_TOKEN)
    tokenizer_2 = build_clip_tokenizer(workdir / "tokenizer_2", pad_token="!")
    tokenizer_3 = build_t5_tokenizer()
    text_encoder = make_text_encoder(tokenizer, 32, with_projection=True)
    text_encoder_2 = make_text_encoder(tokenizer_2, 48, with_projection=True, act="gelu")
    text_encoder_3 = make_t5_encoder(tokenizer_3, 96)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=96, caption_projection_dim=16, pooled_projection_dim=32 + 48, out_channels=16,
        pos_embed_max_size=16,
    )
    vae = make_flow_vae(1.5305, 0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        scheduler=scheduler, vae=vae, transformer=transformer,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def build_tiny_flow_pipeline(arch: str, seed: int = 0):
    """A tiny `FluxPipeline` ("flux-dev", "flux-schnell") or `StableDiffusion3Pipeline` ("sd3"),
    CPU float32. The same seed gives bit-identical weights."""
    if arch not in FLOW_ARCHITECTURES:
        raise ValueError(f"unknown tiny flow architecture {arch!r}; choose from {', '.join(FLOW_ARCHITECTURES)}")
    with tempfile.TemporaryDirectory() as workdir:
        if arch == "sd3":
            pipe = _build_sd3(seed, Path(workdir))
        else:
            pipe = _build_flux(seed, Path(workdir), dev=arch == "flux-dev")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as `from_pretrained` leaves them: T5's dropout (0.1) off
    pipe.set_progress_bar_config(disable=True)
    return pipe
