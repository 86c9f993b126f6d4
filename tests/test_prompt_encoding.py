"""Prompt encoding on tiny SD1 / SD2-v / SDXL pipelines: equal to diffusers' own encoding for
plain prompts, A1111 chunk/emphasis arithmetic, embedding insertion, the seed's identity
property, A1111's init rule, gradients into the vectors."""

from __future__ import annotations

import pytest
import torch
from helpers_embeddings import tiny_pipeline

from testing.tiny import build_tiny_pipeline
from tinv_lib.common.errors import TinvError
from tinv_lib.embeddings import Embedding
from tinv_lib.embeddings.create import create_embedding, create_embedding_vectors
from tinv_lib.models.family import family_of
from tinv_lib.prompts.encoding import PromptEncoder

ARCHS = ["sd1", "sd2-v", "sdxl"]


def bitwise(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_prompts_encode_exactly_as_the_pipeline(arch):
    pipe = tiny_pipeline(arch)
    inputs, used = PromptEncoder.from_pipeline(pipe).pipeline_inputs("a photo of a red tree", "blurry, ugly")
    with torch.no_grad():
        theirs = pipe.encode_prompt(
            "a photo of a red tree", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt="blurry, ugly",
        )
    assert bitwise(inputs["prompt_embeds"], theirs[0]) and bitwise(inputs["negative_prompt_embeds"], theirs[1])
    if arch == "sdxl":
        assert bitwise(inputs["pooled_prompt_embeds"], theirs[2])
        assert bitwise(inputs["negative_pooled_prompt_embeds"], theirs[3])
    assert used == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("init_text", "vectors"), [("tree", 1), ("a red tree", 3)])
def test_identity_property_of_untrained_embeddings(arch, init_text, vectors):
    """An embedding created from init text encodes exactly as that text (the seed's promise)."""
    pipe = tiny_pipeline(arch)
    embedding = create_embedding("my-new-thing", family_of(pipe), init_text, vectors)
    encoder = PromptEncoder.from_pipeline(pipe)
    with torch.no_grad():
        ours = encoder.encode("a photo of my-new-thing, (painting:1.2)", {"my-new-thing": embedding})
        plain = encoder.encode(f"a photo of {init_text}, (painting:1.2)")
    assert bitwise(ours.embeds, plain.embeds)
    if arch == "sdxl":
        assert bitwise(ours.pooled, plain.pooled)
    assert ours.used == [embedding]


def test_create_embedding_vectors_follows_a1111_rule():
    pipe = tiny_pipeline("sd1")
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = pipe.tokenizer("a red tree", add_special_tokens=False)["input_ids"]
    family = family_of(pipe)
    five = create_embedding_vectors(family, "a red tree", 5)
    assert torch.equal(five, weight[[ids[0], ids[0], ids[1], ids[1], ids[2]]])  # row i = token i·3//5
    two = create_embedding_vectors(family, "a red tree", 2)
    assert torch.equal(two, weight[ids[:2]])  # only the first nvpt tokens are kept
    assert torch.equal(create_embedding_vectors(family, "", 4), torch.zeros(4, 32))
    assert not five.requires_grad and five.dtype == torch.float32
    xl = tiny_pipeline("sdxl")
    both = create_embedding_vectors(family_of(xl), "cat", 2)
    assert {key: value.shape for key, value in both.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    with pytest.raises(TinvError, match="between 1 and 75"):
        create_embedding_vectors(family, "cat", 0)
    assert create_embedding("bad/name*", family).name == "badname"


def test_emphasis_arithmetic_matches_a1111():
    pipe = build_tiny_pipeline("sd1")
    # A freshly built encoder's final LayerNorm has zero bias, so every token's hidden state
    # averages 0 and "restore the mean" would compare float noise; a real CLIP's bias does not.
    final_norm = pipe.text_encoder.get_submodule("final_layer_norm")
    with torch.no_grad():
        final_norm.bias.copy_(torch.linspace(0.0, 1.0, final_norm.bias.numel()))
        z = PromptEncoder.from_pipeline(pipe).encode("a (red:1.5) [tree]").embeds
        flat = PromptEncoder.from_pipeline(pipe, emphasis="Ignore").encode("a (red:1.5) [tree]").embeds
        no_norm = PromptEncoder.from_pipeline(pipe, emphasis="No norm").encode("a (red:1.5) [tree]").embeds
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1
    scaled = flat * weights[None, :, None]
    assert torch.equal(no_norm, scaled)
    assert torch.equal(z, scaled * (flat.mean() / scaled.mean()))
    assert torch.allclose(z.mean(), flat.mean(), rtol=1e-5)
    assert not torch.allclose(no_norm.mean(), flat.mean(), rtol=1e-3)


def test_chunks_are_encoded_independently_and_concatenated():
    encoder = PromptEncoder.from_pipeline(tiny_pipeline("sdxl"))
    with torch.no_grad():
        long = encoder.encode(" ".join(["tree"] * 80))
        first, second = encoder.encode(" ".join(["tree"] * 75)), encoder.encode(" ".join(["tree"] * 5))
        broken = encoder.encode("a cat BREAK a dog")
        halves = encoder.encode("a cat"), encoder.encode("a dog")
    assert long.embeds.shape == (1, 154, 80)
    assert torch.equal(long.embeds, torch.cat([first.embeds, second.embeds], dim=1))
    assert torch.equal(long.pooled, first.pooled)  # pooled comes from the first chunk
    assert torch.equal(broken.embeds, torch.cat([halves[0].embeds, halves[1].embeds], dim=1))


def test_cond_and_uncond_lengths_are_padded_and_sdxl_zeroes_empty_negative():
    encoder = PromptEncoder.from_pipeline(tiny_pipeline("sdxl"))
    with torch.no_grad():
        inputs, _ = encoder.pipeline_inputs(" ".join(["cat"] * 90), "")
        assert inputs["negative_prompt_embeds"].shape == inputs["prompt_embeds"].shape == (1, 154, 80)
        assert not inputs["negative_prompt_embeds"].any() and not inputs["negative_pooled_prompt_embeds"].any()
        inputs, _ = encoder.pipeline_inputs(" ".join(["cat"] * 90), "blurry")
        negative = inputs["negative_prompt_embeds"]
        assert negative.shape == (1, 154, 80) and torch.equal(negative[:, 77:], negative[:, 76:77].expand(-1, 77, -1))
        assert inputs["negative_pooled_prompt_embeds"].any()


def test_embeddings_in_prompt_and_negative_are_both_used():
    encoder = PromptEncoder.from_pipeline(tiny_pipeline("sd1"))
    style, bad = Embedding("style", torch.randn(2, 32)), Embedding("badthing", torch.randn(4, 32))
    with torch.no_grad():
        inputs, used = encoder.pipeline_inputs("a cat, style", "badthing, blurry", {"style": style, "badthing": bad})
        plain, _ = encoder.pipeline_inputs("a cat, style", "badthing, blurry")
    assert used == [style, bad]
    assert not torch.equal(inputs["prompt_embeds"], plain["prompt_embeds"])
    assert not torch.equal(inputs["negative_prompt_embeds"], plain["negative_prompt_embeds"])


def test_gradients_reach_the_vectors():
    """What the trainer relies on: encoding with trainable vectors is differentiable in them."""
    pipe = tiny_pipeline("sdxl")
    vectors = {"clip_l": torch.randn(2, 32, requires_grad=True), "clip_g": torch.randn(2, 48, requires_grad=True)}
    out = PromptEncoder.from_pipeline(pipe).encode(["a photo of thing", "thing"], {"thing": Embedding("thing", vectors)})
    loss = out.embeds.square().mean() + out.pooled.square().mean()
    grad_l, grad_g = torch.autograd.grad(loss, [vectors["clip_l"], vectors["clip_g"]])
    assert grad_l.abs().sum() > 0 and grad_g.abs().sum() > 0


def test_embedding_of_the_wrong_kind_is_a_one_line_error():
    encoder = PromptEncoder.from_pipeline(tiny_pipeline("sd1"))
    with pytest.raises(TinvError, match="width 48"):
        encoder.encode("x", {"x": Embedding("x", torch.zeros(1, 48))})
    with pytest.raises(TinvError, match="has vectors for clip_l, clip_g and does not fit this SD1 model"):
        encoder.encode("x", {"x": Embedding("x", {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)})})
    with pytest.raises(TinvError, match="single-encoder embedding and does not fit this SDXL model"):
        PromptEncoder.from_pipeline(tiny_pipeline("sdxl")).encode("x", {"x": Embedding("x", torch.zeros(1, 32))})
    assert PromptEncoder.from_pipeline(tiny_pipeline("sdxl")).expected_dim == {"clip_l": 32, "clip_g": 48}
