"""Applying hypernetworks to tiny SD1 / SD2 / SDXL UNets through attention processors.

Acceptance 3 of issue 5: multiplier 0 gives exactly the image of no hypernetwork, multiplier 1
differs, and `<hypernet:a:1> <hypernet:b:1>` applies both, a first. Plus what the trainer
relies on: training mode ignores the multiplier, gradients reach only the hypernetwork, the
UNet's own parameters and state dict never include it, and fp16/bf16 UNets keep float32
hypernetwork weights.
"""

import logging

import numpy as np
import pytest
import torch

from testing.tiny import build_tiny_pipeline
from tinv_lib.generation.extra_networks import HypernetworkHandler
from tinv_lib.hypernetworks import (
    HypernetworkAttnProcessor,
    apply_hypernetworks,
    context_widths,
    create_hypernetwork,
    install_hypernetworks,
    make_options,
    save_hypernetwork,
)
from tinv_lib.prompts.syntax import parse_extra_networks


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl")


def _image(pipe, prompt="a red circle"):
    return pipe(
        prompt, num_inference_steps=2, height=64, width=64,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images


def _network(name, unet, seed, activation="relu"):
    """A visibly strong network (Xavier init, not A1111's near-identity Normal init)."""
    return create_hypernetwork(name, context_widths(unet), make_options("1, 2, 1", activation, "XavierNormal"), seed=seed)


def test_default_sizes_are_every_k_v_context_width():
    """Cross-attention width first, then self-attention widths (SD1 real: 768, 320, 640, 1280)."""
    assert context_widths(build_tiny_pipeline("sd1").unet) == [32, 64]  # cross 32 = a self width
    assert context_widths(build_tiny_pipeline("sd2-v").unet) == [48, 32, 64]
    assert context_widths(build_tiny_pipeline("sdxl").unet) == [80, 64]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_multiplier_zero_is_the_bare_image_and_one_differs(arch, request):
    pipe = request.getfixturevalue(arch)
    bare = _image(pipe)
    originals = dict(pipe.unet.attn_processors)
    network = _network("a", pipe.unet, seed=1)
    with apply_hypernetworks(pipe.unet, [(network, 0.0)]):
        assert all(isinstance(p, HypernetworkAttnProcessor) for p in pipe.unet.attn_processors.values())
        at_zero = _image(pipe)
    with apply_hypernetworks(pipe.unet, [(network, 1.0)]):
        at_one = _image(pipe)
    assert np.array_equal(at_zero, bare)
    assert np.abs(at_one - bare).max() > 1e-3
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in originals.items())
    assert np.array_equal(_image(pipe), bare)


def test_prompt_tags_apply_both_networks_in_order(sd1, tmp_path):
    a, b = _network("a", sd1.unet, seed=1), _network("b", sd1.unet, seed=2, activation="tanh")
    save_hypernetwork(a, tmp_path / "a.pt")
    save_hypernetwork(b, tmp_path / "b.pt")
    prompt, tags = parse_extra_networks("a red circle<hypernet:a:1><hypernet:b:1>")
    handler = HypernetworkHandler(tmp_path, notify=pytest.fail)
    with handler(sd1, tags["hypernet"]):
        both = _image(sd1, prompt)
    assert prompt == "a red circle" and handler.applied == [("a", 1.0), ("b", 1.0)]

    def image_with(stack):
        with apply_hypernetworks(sd1.unet, stack):
            return _image(sd1, prompt)

    assert np.array_equal(both, image_with([(a, 1.0), (b, 1.0)]))
    for other in ([(a, 1.0)], [(b, 1.0)], [(b, 1.0), (a, 1.0)]):
        assert np.abs(both - image_with(other)).max() > 1e-4


def _capture(unet, layer_name):
    """Record what one attention layer receives and what enters its to_k / to_v."""
    layer = unet.get_submodule(layer_name)
    seen = {}

    def on_layer(module, args, kwargs):
        context = kwargs.get("encoder_hidden_states")
        seen["context"] = args[0] if context is None else context

    def on_projection(name):
        def hook(module, args):
            seen[name] = args[0]
        return hook

    hooks = [
        layer.register_forward_pre_hook(on_layer, with_kwargs=True),
        layer.to_k.register_forward_pre_hook(on_projection("k")),
        layer.to_v.register_forward_pre_hook(on_projection("v")),
    ]
    return seen, hooks


@pytest.mark.parametrize("layer_name", [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",  # cross-attention, width 32
    "mid_block.attentions.0.transformer_blocks.0.attn1",  # self-attention, width 64
])
def test_k_and_v_contexts_go_through_the_chain_in_order(sd1, layer_name):
    unet = sd1.unet
    a, b = _network("a", unet, seed=1), _network("b", unet, seed=2, activation="tanh")
    seen, hooks = _capture(unet, layer_name)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad(), apply_hypernetworks(unet, [(a, 1.0), (b, 0.5)]):
        unet(latents, 10, encoder_hidden_states=text)
    for handle in hooks:
        handle.remove()
    context = seen["context"]
    width = context.shape[-1]
    (a_k, a_v), (b_k, b_v) = a.modules_for(width), b.modules_for(width)
    with torch.no_grad():
        assert torch.equal(seen["k"], b_k(a_k(context, 1.0), 0.5))
        assert torch.equal(seen["v"], b_v(a_v(context, 1.0), 0.5))
        assert not torch.allclose(seen["k"], a_k(b_k(context, 0.5), 1.0))
        assert not torch.allclose(seen["k"], seen["v"])


def test_nested_application_stacks_and_unwinds(sd1):
    unet = sd1.unet
    a, b = _network("a", unet, seed=1), _network("b", unet, seed=2)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        with apply_hypernetworks(unet, [(a, 1.0), (b, 1.0)]):
            together = unet(latents, 10, encoder_hidden_states=text).sample
        with apply_hypernetworks(unet, [(a, 1.0)]):
            with apply_hypernetworks(unet, [(b, 1.0)]):
                nested = unet(latents, 10, encoder_hidden_states=text).sample
            only_a = unet(latents, 10, encoder_hidden_states=text).sample
        with apply_hypernetworks(unet, [(a, 1.0)]):
            assert torch.equal(unet(latents, 10, encoder_hidden_states=text).sample, only_a)
    assert torch.equal(together, nested)
    assert not torch.equal(together, only_a)


def test_training_ignores_multiplier_and_grads_reach_only_the_hypernetwork(sd1):
    unet = sd1.unet
    unet.requires_grad_(False)
    keys_before = list(unet.state_dict())
    network = create_hypernetwork("t", context_widths(unet), make_options(), seed=3).train()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        bare = unet(latents, 10, encoder_hidden_states=text).sample
    with apply_hypernetworks(unet, [(network, 0.0)]):
        output = unet(latents, 10, encoder_hidden_states=text).sample
        assert list(unet.state_dict()) == keys_before
        assert not {id(p) for p in network.parameters()} & {id(p) for p in unet.parameters()}
    assert not torch.equal(output, bare)  # the 0 multiplier is ignored while training
    torch.nn.functional.mse_loss(output, torch.zeros_like(output)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert all(p.grad is None for p in unet.parameters())
    network.eval()


def test_half_precision_unet_keeps_float32_hypernetwork(sdxl):
    unet = sdxl.unet.to(torch.bfloat16)
    try:
        network = _network("h", unet, seed=4)
        sample, text = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.randn(1, 7, 80, dtype=torch.bfloat16)
        added = {"text_embeds": torch.randn(1, 48, dtype=torch.bfloat16), "time_ids": torch.zeros(1, 6, dtype=torch.bfloat16)}
        with torch.no_grad():
            bare = unet(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
            with apply_hypernetworks(unet, [(network, 0.0)]):
                zero = unet(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
            with apply_hypernetworks(unet, [(network, 1.0)]):
                one = unet(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
        assert zero.dtype == torch.bfloat16 and torch.equal(zero, bare) and not torch.equal(one, bare)
        assert {p.dtype for p in network.parameters()} == {torch.float32}
    finally:
        unet.to(torch.float32)


def test_a_network_for_other_widths_changes_nothing_and_says_so(sd1, caplog):
    network = create_hypernetwork("sdxl-only", [2048], make_options(), seed=0)
    with caplog.at_level(logging.WARNING), apply_hypernetworks(sd1.unet, [(network, 1.0)]):
        assert not any(isinstance(p, HypernetworkAttnProcessor) for p in sd1.unet.attn_processors.values())
    assert "has no effect" in caplog.text


def test_install_returns_a_restore_function(sd1):
    before = dict(sd1.unet.attn_processors)
    restore = install_hypernetworks(sd1.unet, [(_network("a", sd1.unet, seed=1), 1.0)])
    assert dict(sd1.unet.attn_processors) != before
    restore()
    assert dict(sd1.unet.attn_processors) == before
