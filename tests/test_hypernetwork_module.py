"""HypernetworkModule / Hypernetwork: layer layout, activations, init quirks, forward semantics.

Layouts are the worked examples of docs/formats.md, "Module layout"; seeded creations are
compared with the modules A1111 itself created (tests/fixtures/a1111, made by A1111's
`create_hypernetwork` after `torch.manual_seed`).
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from tinv_lib.common.errors import TinvError
from tinv_lib.hypernetworks import (
    ACTIVATIONS,
    HypernetworkModule,
    activation_names,
    create_hypernetwork,
    load_hypernetwork,
    make_options,
    parse_sizes,
)

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"


def _layout(module: HypernetworkModule) -> list[str]:
    return [type(layer).__name__ for layer in module.linear]


def _shapes(module: HypernetworkModule) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in module.state_dict().items()}


def test_linear_121_keys_match_formats_example():
    module = HypernetworkModule(768, make_options("1, 2, 1", "linear"))
    assert _shapes(module) == {
        "linear.0.weight": [1536, 768], "linear.0.bias": [1536],
        "linear.1.weight": [768, 1536], "linear.1.bias": [768],
    }


def test_relu_layernorm_dropout_keys_match_formats_example():
    options = make_options("1, 2, 1", "relu", add_layer_norm=True, dropout_structure="0, 0.1, 0")
    module = HypernetworkModule(768, options)
    assert _layout(module) == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]
    assert module.linear[3].p == 0.1
    assert sorted({key.rsplit(".", 1)[0] for key in module.state_dict()}) == [
        "linear.0", "linear.2", "linear.4", "linear.5",
    ]
    assert _shapes(module)["linear.5.weight"] == [768]


def test_activate_output_adds_an_activation_after_the_last_linear():
    module = HypernetworkModule(8, make_options("1, 2, 1", "tanh", activate_output=True))
    assert _layout(module) == ["Linear", "Tanh", "Linear", "Tanh"]


def test_fractional_structure_uses_int_of_width_times_multiplier():
    module = HypernetworkModule(10, make_options("1, 1.55, 1", "linear"))
    assert _shapes(module)["linear.0.weight"] == [15, 10]


def test_swish_is_hardswish_and_the_full_torch_list_is_there():
    assert ACTIVATIONS["swish"] is nn.Hardswish
    assert ACTIVATIONS["linear"] is nn.Identity
    for name in ("relu", "leakyrelu", "elu", "tanh", "sigmoid", "gelu", "silu", "mish", "softsign", "prelu",
                 "celu", "selu", "softplus", "hardswish"):
        assert name in activation_names()
    assert "multiheadattention" not in activation_names()


def test_prelu_parameters_are_saved_at_their_position():
    module = HypernetworkModule(8, make_options("1, 2, 1", "prelu"))
    assert "linear.1.weight" in module.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_structure": "2, 2, 1"}, "start and end with 1"),
        ({"layer_structure": "1, x, 1"}, "comma-separated numbers"),
        ({"activation_func": "nope"}, "unknown activation"),
        ({"activation_func": "threshold"}, "needs constructor arguments"),
        ({"weight_init": "Orthogonal"}, "unknown weight init"),
        ({"dropout_structure": "0, 0.1"}, "one value per"),
        ({"dropout_structure": "0, 1.5, 0"}, "[0, 1)"),
        ({"dropout_structure": "0, 0.1, 0.1"}, "first and last"),
    ],
)
def test_bad_create_options_are_one_line_errors(kwargs, message):
    with pytest.raises(TinvError, match=message.replace("[", r"\[").replace(")", r"\)")) as error:
        make_options(**kwargs)
    assert "\n" not in str(error.value)


def test_dropout_off_writes_zeros_even_if_a_structure_is_typed():
    options = make_options("1, 2, 1", use_dropout=False, dropout_structure="0, 0.1, 0")
    assert options.dropout_structure == [0, 0, 0]
    assert not options.use_dropout


def test_dropout_on_without_structure_uses_the_dec_2022_rule():
    assert make_options("1, 2, 2, 1", use_dropout=True).dropout_structure == [0, 0.3, 0, 0]
    assert make_options("1, 2, 2, 1", use_dropout=True, last_layer_dropout=True).dropout_structure == [0, 0.3, 0.3, 0]


def test_sizes_flag():
    assert parse_sizes("768,320, 640 1280") == [768, 320, 640, 1280]
    with pytest.raises(TinvError):
        parse_sizes("768,abc")


@pytest.mark.parametrize(
    ("tag", "seed", "sizes", "options"),
    [
        ("a-linear", 101, [24, 10, 20, 40], ("1, 2, 1", "linear", "Normal", False, False, "0, 0, 0")),
        ("b-relu-ln-dropout", 102, [24, 10], ("1, 2, 1", "relu", "Normal", True, True, "0, 0.1, 0")),
        ("c-swish-xavier", 103, [24], ("1, 1.5, 1", "swish", "XavierUniform", False, False, "0, 0, 0")),
    ],
)
def test_seeded_creation_equals_what_a1111_created(tag, seed, sizes, options):
    """Same calls in the same order as A1111: the init quirks (LayerNorm N(0, 0.01), std-0 bias
    draws) are reproduced exactly, and the global RNG is left alone."""
    before = torch.random.get_rng_state()
    ours = create_hypernetwork("x", sizes, make_options(*options), seed=seed)
    assert torch.equal(before, torch.random.get_rng_state())
    theirs = load_hypernetwork(FIXTURES / f"hn-{tag}-legacy.pt")
    assert ours.sizes == theirs.sizes == sizes
    for size in sizes:
        for mine, reference in zip(ours.modules_for(size), theirs.modules_for(size)):
            assert mine.state_dict().keys() == reference.state_dict().keys()
            for key, value in reference.state_dict().items():
                assert torch.equal(mine.state_dict()[key], value), key


@pytest.mark.parametrize("init", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_every_init_zeroes_biases_and_layernorm_starts_near_zero(init):
    network = create_hypernetwork("x", [64], make_options("1, 2, 1", "leakyrelu", init, add_layer_norm=True), seed=0)
    module = network.modules_for(64)[0]
    linear, norm = module.linear[0], module.linear[2]
    assert torch.count_nonzero(linear.bias) == 0
    assert torch.count_nonzero(norm.bias) == 0
    assert norm.weight.abs().max() < 0.1  # N(0, 0.01) whatever the setting, not ones
    expected_std = {"Normal": 0.01, "XavierUniform": (2 / 192) ** 0.5, "XavierNormal": (2 / 192) ** 0.5,
                    "KaimingUniform": (2 / 64) ** 0.5, "KaimingNormal": (2 / 64) ** 0.5}[init]
    assert linear.weight.std().item() == pytest.approx(expected_std, rel=0.1)


def test_different_inits_give_different_weights_from_one_seed():
    weights = {
        init: create_hypernetwork("x", [16], make_options(weight_init=init), seed=0).modules_for(16)[0].linear[0].weight
        for init in ("Normal", "XavierUniform", "KaimingNormal")
    }
    assert not torch.equal(weights["Normal"], weights["XavierUniform"])
    assert not torch.equal(weights["XavierUniform"], weights["KaimingNormal"])


def test_forward_is_residual_with_multiplier_in_eval_mode():
    network = create_hypernetwork("x", [16], make_options(weight_init="XavierNormal"), seed=0)
    module = network.modules_for(16)[0]
    x = torch.randn(2, 5, 16)
    delta = module.linear(x)
    assert torch.equal(module(x, 0.0), x)
    assert torch.allclose(module(x, 0.5), x + delta * 0.5, atol=0, rtol=0)
    assert torch.allclose(module(x), x + delta, atol=0, rtol=0)


def test_training_mode_ignores_the_multiplier_and_enables_dropout_and_grads():
    options = make_options("1, 2, 1", "relu", "XavierNormal", dropout_structure="0, 0.5, 0")
    network = create_hypernetwork("x", [16], options, seed=0)
    module = network.modules_for(16)[0]
    x = torch.randn(4, 8, 16)
    assert not any(p.requires_grad for p in network.parameters())
    network.train()
    assert all(p.requires_grad for p in network.parameters())
    torch.manual_seed(0)
    at_zero = module(x, 0.0)
    torch.manual_seed(0)
    at_one = module(x, 1.0)
    assert torch.equal(at_zero, at_one) and not torch.equal(at_zero, x)
    assert not torch.equal(module(x), module(x))  # dropout is active
    network.eval()
    assert torch.equal(module(x), module(x))
    assert not any(p.requires_grad for p in network.parameters())


def test_parameters_are_float32_and_follow_a1111_order():
    network = create_hypernetwork("x", [16, 8], make_options(add_layer_norm=True), seed=0)
    shapes = [tuple(p.shape) for p in network.parameters()]
    one_module = [(32, 16), (32,), (32,), (32,), (16, 32), (16,), (16,), (16,)]
    assert shapes[:16] == one_module * 2  # width 16: k then v
    assert shapes[16] == (16, 8)  # then width 8
    assert {p.dtype for p in network.parameters()} == {torch.float32}


def test_half_precision_context_in_and_out():
    network = create_hypernetwork("x", [16], make_options(weight_init="XavierNormal"), seed=0)
    module = network.modules_for(16)[0]
    x = torch.randn(1, 3, 16, dtype=torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (x.float() + module.linear(x.float())).to(torch.bfloat16))


def test_bad_name_and_sizes():
    with pytest.raises(TinvError, match="empty"):
        create_hypernetwork("///", [8], make_options())
    assert create_hypernetwork("my/net?", [8], make_options()).name == "mynet"
    with pytest.raises(TinvError, match="distinct"):
        create_hypernetwork("x", [8, 8], make_options())
