"""The tiny FLUX.1 and SD3 factory: offline, deterministic, real T5 and CLIP tokenizers."""

import numpy as np
import pytest
import torch

from testing.tiny_flow import FLOW_ARCHITECTURES, build_t5_tokenizer, build_tiny_flow_pipeline
from testing.tokenizer_build import COMMON_WORDS

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(pipe, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of a red tree", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
                generator=generator, output_type="np").images


@pytest.mark.parametrize("arch", FLOW_ARCHITECTURES)
def test_each_tiny_flow_pipeline_generates_reproducibly(arch):
    pipe = build_tiny_flow_pipeline(arch, seed=0)
    first, again, other = _generate(pipe, 1), _generate(pipe, 1), _generate(pipe, 2)
    assert first.shape == (1, 64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_tiny_flow_pipeline("flux-dev", seed=s) for s in (3, 3, 4))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)


def test_widths_differ_between_encoders_and_families_are_as_released():
    dev, schnell, sd3 = (build_tiny_flow_pipeline(arch) for arch in FLOW_ARCHITECTURES)
    assert (dev.text_encoder.config.hidden_size, dev.text_encoder_2.config.d_model) == (32, 40)
    widths = (sd3.text_encoder.config.hidden_size, sd3.text_encoder_2.config.hidden_size,
              sd3.text_encoder_3.config.d_model)
    assert widths == (32, 48, 96)
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    assert sd3.scheduler.config.shift == 3.0
    for pipe in (dev, sd3):
        assert pipe.vae.config.shift_factor is not None and pipe.vae.config.latent_channels == 16


def test_t5_tokenizer_is_sentencepiece_like():
    tokenizer = build_t5_tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("A red circle, zq").input_ids)
    assert pieces == ["\u2581a", "\u2581red", "\u2581circle", ",", "\u2581", "z", "q", "</s>"]
    assert not any("</w>" in piece for piece in tokenizer.get_vocab())
    for word in ("tree", "photo", "painting", "style"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(set(COMMON_WORDS)) + 3 < len(tokenizer)


def test_saved_folders_load_back_bit_for_bit(tiny_flux_path, tiny_sd3_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    for path, pipe_class, arch in ((tiny_flux_path, FluxPipeline, "flux-dev"),
                                   (tiny_sd3_path, StableDiffusion3Pipeline, "sd3")):
        loaded, built = pipe_class.from_pretrained(path), build_tiny_flow_pipeline(arch)
        state, expected = loaded.transformer.state_dict(), built.transformer.state_dict()
        assert all(torch.equal(state[key], expected[key]) for key in expected)
        assert loaded.tokenizer_2("a red tree").input_ids == built.tokenizer_2("a red tree").input_ids
