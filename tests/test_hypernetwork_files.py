"""Hypernetwork `.pt` files and `.optim` sidecars against A1111's own files and loaders.

* A1111-made fixtures load with A1111's outputs (≤ 1e-6 abs, in practice exact).
* A reference forward written here from docs/formats.md ("Hypernetwork files") alone agrees with
  ours on every file.
* Files we write: A1111's key order and types, `torch.load(weights_only=True)`, and the A1111
  restricted-unpickler check (re-implemented here from docs/formats.md,
  "Safe loading").
* Legacy `linear1`/`linear2` files without metadata load with the old defaults.
"""

import collections
import hashlib
import logging
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tinv_lib.common.errors import FileFormatError, TinvError
from tinv_lib.hypernetworks import (
    create_hypernetwork,
    hypernetwork_to_dict,
    load_hypernetwork,
    load_optimizer_sidecar,
    make_options,
    optimizer_sidecar_path,
    save_hypernetwork,
    save_optimizer_sidecar,
)

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"
NETWORKS = {"a": "hn-a-linear", "b": "hn-b-relu-ln-dropout", "c": "hn-c-swish-xavier"}
METADATA_ORDER = [
    "step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
    "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
    "last_layer_dropout", "optional_info",
]


# --- an independent reading of docs/formats.md, "Hypernetwork files" ------------------------


def reference_layers(meta: dict) -> list[tuple[int, str]]:
    """(Sequential index, kind) per docs/formats.md, "Module layout", with its load defaults and
    the dropout rule of older files."""
    ls = meta.get("layer_structure", [1, 2, 1])
    act = meta.get("activation_func")
    dropout = meta.get("dropout_structure")
    if dropout is None:
        use, last = meta.get("use_dropout", False), meta.get("last_layer_dropout", False)
        dropout = [0] * len(ls) if not use else [0] + [0.3] * (len(ls) - 3) + [0.3 if last else 0] + [0]
    kinds = []
    for i in range(len(ls) - 1):
        kinds.append("linear")
        last_linear = i == len(ls) - 2
        if act not in ("linear", None) and not (last_linear and not meta.get("activate_output", True)):
            kinds.append(act)
        if meta.get("is_layer_norm", False):
            kinds.append("layernorm")
        if dropout[i + 1] > 0:
            kinds.append("dropout")
    return list(enumerate(kinds))


def reference_forward(state: dict, meta: dict, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """y = x + mlp(x) * m, eval mode (dropout off), functional ops only."""
    state = {re.sub(r"^linear([12])\.", lambda m: f"linear.{int(m.group(1)) - 1}.", k): v for k, v in state.items()}
    h = x
    for index, kind in reference_layers(meta):
        weight, bias = state.get(f"linear.{index}.weight"), state.get(f"linear.{index}.bias")
        if kind == "linear":
            h = F.linear(h, weight, bias)
        elif kind == "layernorm":
            h = F.layer_norm(h, (h.shape[-1],), weight, bias, eps=1e-5)
        elif kind == "relu":
            h = F.relu(h)
        elif kind == "swish":
            h = F.hardswish(h)
        elif kind == "tanh":
            h = torch.tanh(h)
        elif kind != "dropout":
            raise AssertionError(f"reference has no {kind}")
    return x + h * multiplier


# --- the A1111 whitelist check, per docs/formats.md, "Safe loading" ------------------------

_A1111_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("__builtin__", "set"): set,
    **{("torch._utils", name): getattr(torch._utils, name)
       for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")},
    **{("torch", name): getattr(torch, name)
       for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                    "float32", "BFloat16Storage")},
}


class _A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _A1111_ALLOWED:
            return _A1111_ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)


def a1111_accepts(path: Path) -> bool:
    """A1111 `safe.check_pt`: zip names filtered by regex, else five restricted pickles."""
    try:
        return _a1111_check(path)
    except pickle.UnpicklingError:
        return False


def _a1111_check(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not all(re.match(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$", name) for name in names):
                return False
            (pkl,) = [name for name in names if name.endswith("/data.pkl")]
            with archive.open(pkl) as handle:
                _A1111Unpickler(handle).load()
            return True
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            unpickler = _A1111Unpickler(handle)
            for _ in range(5):
                unpickler.load()
        return True


# --- A1111's files ---------------------------------------------------------------------------


@pytest.mark.parametrize("serialization", ["default", "legacy"])
@pytest.mark.parametrize("key", sorted(NETWORKS))
def test_a1111_files_give_a1111_outputs(key, serialization):
    path = FIXTURES / f"{NETWORKS[key]}-{serialization}.pt"
    expected = load_file(FIXTURES / f"hn-{key}-expected.safetensors")
    network = load_hypernetwork(path)
    assert network.name == f"fixture-hn-{key}" and network.step == 0 and not network.training
    raw = torch.load(path, weights_only=True)
    for size in network.sizes:
        context = expected[f"context_w{size}"]
        for index, kind in enumerate("kv"):
            module = network.modules_for(size)[index]
            for multiplier in (1.0, 0.5):
                want = expected[f"{kind}_w{size}_mult{multiplier}"]
                ours = module(context, multiplier)
                assert (ours - want).abs().max() <= 1e-6
                reference = reference_forward(raw[size][index], raw, context, multiplier)
                assert (reference - want).abs().max() <= 1e-6
            assert (module(context, 1.0) - context).abs().mean() > 1e-4  # not the identity


def test_fixture_structure_is_read_from_the_metadata():
    b = load_hypernetwork(FIXTURES / "hn-b-relu-ln-dropout-legacy.pt")
    assert b.sizes == [24, 10]
    assert [type(m).__name__ for m in b.modules_for(24)[1].linear] == [
        "Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm",
    ]
    assert b.options.use_dropout and b.options.dropout_structure == [0.0, 0.1, 0.0]
    c = load_hypernetwork(FIXTURES / "hn-c-swish-xavier-legacy.pt")
    assert [type(m).__name__ for m in c.modules_for(24)[0].linear] == ["Linear", "Hardswish", "Linear"]


# --- files we write --------------------------------------------------------------------------


def _made(tmp_path: Path, key: str) -> tuple[Path, dict]:
    args = {
        "a": ("fixture-hn-a", [24, 10, 20, 40], 101, ("1, 2, 1", "linear", "Normal", False, False, "0, 0, 0")),
        "b": ("fixture-hn-b", [24, 10], 102, ("1, 2, 1", "relu", "Normal", True, True, "0, 0.1, 0")),
        "c": ("fixture-hn-c", [24], 103, ("1, 1.5, 1", "swish", "XavierUniform", False, False, "0, 0, 0")),
    }[key]
    network = create_hypernetwork(args[0], args[1], make_options(*args[3]), seed=args[2])
    path = tmp_path / f"{args[0]}.pt"
    save_hypernetwork(network, path)
    return path, torch.load(FIXTURES / f"{NETWORKS[key]}-legacy.pt", weights_only=True)


@pytest.mark.parametrize("key", sorted(NETWORKS))
def test_written_files_equal_a1111_files_in_content_order_and_types(tmp_path, key):
    path, theirs = _made(tmp_path, key)
    ours = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    assert list(ours)[-len(METADATA_ORDER):] == METADATA_ORDER
    for name, value in theirs.items():
        if isinstance(name, int):
            assert isinstance(ours[name], tuple) and len(ours[name]) == 2
            for mine, reference in zip(ours[name], value):
                assert isinstance(mine, collections.OrderedDict)
                assert list(mine) == list(reference)
                assert list(mine._metadata) == list(reference._metadata)
                assert all(torch.equal(mine[k], reference[k]) and mine[k].dtype == torch.float32 for k in mine)
        else:
            assert ours[name] == value and type(ours[name]) is type(value), name
            if isinstance(value, list):
                assert [type(v) for v in ours[name]] == [type(v) for v in value]


@pytest.mark.parametrize("key", sorted(NETWORKS))
def test_written_files_pass_a1111_check_and_weights_only(tmp_path, key):
    path, _ = _made(tmp_path, key)
    assert not zipfile.is_zipfile(path)  # legacy serialization, what A1111 accepts
    assert a1111_accepts(path)
    torch.load(path, weights_only=True)


def test_the_a1111_check_rejects_what_a1111_rejects(tmp_path):
    assert not a1111_accepts(FIXTURES / "hn-a-linear-default.pt")
    assert a1111_accepts(FIXTURES / "hn-a-linear-legacy.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({8: collections.Counter()}, foreign, _use_new_zipfile_serialization=False)
    assert not a1111_accepts(foreign)


def test_round_trip_keeps_weights_metadata_and_outputs(tmp_path):
    options = make_options("1, 2, 2, 1", "gelu", "KaimingNormal", True, True, "0, 0.05, 0.15, 0", activate_output=True)
    network = create_hypernetwork("round trip", [12, 20], options, seed=5)
    network.step, network.sd_checkpoint, network.sd_checkpoint_name = 41, "0123456789", "tiny model"
    network.optional_info = "notes"
    path = tmp_path / "rt.pt"
    save_hypernetwork(network, path)
    loaded = load_hypernetwork(path)
    assert (loaded.name, loaded.step, loaded.sd_checkpoint, loaded.sd_checkpoint_name, loaded.optional_info) == (
        "round trip", 41, "0123456789", "tiny model", "notes",
    )
    assert loaded.options == network.options and loaded.sizes == [12, 20]
    x = torch.randn(2, 3, 20)
    assert torch.equal(loaded.modules_for(20)[1](x, 0.7), network.modules_for(20)[1](x, 0.7))
    assert torch.load(path, weights_only=True)["last_layer_dropout"] is True


def test_saving_from_a_training_device_state_writes_plain_cpu_tensors(tmp_path):
    network = create_hypernetwork("x", [8], make_options(), seed=0).train()
    path = tmp_path / "x.pt"
    save_hypernetwork(network, path)
    data = torch.load(path, weights_only=True)
    assert all(not t.requires_grad and t.device.type == "cpu" for t in data[8][0].values())


def test_hypernetworks_must_be_saved_as_pt(tmp_path):
    with pytest.raises(TinvError, match=r"\.pt"):
        save_hypernetwork(create_hypernetwork("x", [8], make_options()), tmp_path / "x.safetensors")


# --- legacy files ---------------------------------------------------------------------------


def test_nai_style_file_without_metadata_loads_with_old_defaults(tmp_path):
    generator = torch.Generator().manual_seed(7)

    def nai_state():
        return {
            "linear1.weight": torch.randn(48, 24, generator=generator) * 0.05,
            "linear1.bias": torch.randn(48, generator=generator) * 0.05,
            "linear2.weight": torch.randn(24, 48, generator=generator) * 0.05,
            "linear2.bias": torch.randn(24, generator=generator) * 0.05,
        }

    raw = {24: (nai_state(), nai_state())}
    path = tmp_path / "old-nai.pt"
    torch.save(raw, path, _use_new_zipfile_serialization=False)
    network = load_hypernetwork(path)
    assert network.name == "old-nai" and network.step == 0
    options = network.options
    assert options.layer_structure == [1, 2, 1] and options.activation_func is None
    assert not options.add_layer_norm and options.activate_output and not options.use_dropout
    assert options.dropout_structure == [0, 0, 0] and options.weight_init == "Normal"
    x = torch.randn(3, 5, 24, generator=generator)
    for index in (0, 1):
        want = reference_forward(raw[24][index], {}, x, 0.8)
        assert (network.modules_for(24)[index](x, 0.8) - want).abs().max() <= 1e-6


def test_dec_2022_file_gets_fixed_dropout_and_activated_output(tmp_path):
    """No `dropout_structure`, no `activate_output`: use_dropout + last_layer_dropout give
    p=0.3 after the first Linear, and the last Linear is activated (pre-#3698 default)."""
    source = create_hypernetwork("x", [8], make_options("1, 2, 1", "relu", activate_output=True,
                                                        dropout_structure="0, 0.3, 0"), seed=1)
    data = hypernetwork_to_dict(source)
    for key in ("dropout_structure", "activate_output", "optional_info"):
        del data[key]
    data["use_dropout"], data["last_layer_dropout"] = True, True
    path = tmp_path / "dec2022.pt"
    torch.save(data, path, _use_new_zipfile_serialization=False)
    network = load_hypernetwork(path)
    assert [type(m).__name__ for m in network.modules_for(8)[0].linear] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    assert network.options.dropout_structure == [0, 0.3, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "emb"}, "embedding"),
        ({"step": 3}, "no integer"),
        ([1, 2, 3], "not a hypernetwork"),
        ({8: "oops"}, "pair"),
        ({8: ({"linear.0.weight": torch.zeros(3, 3)}, {})}, "do not fit"),
        ({8: ({}, {}), "layer_structure": "1,2,1"}, "damaged"),
        ({8: ({}, {}), "layer_structure": [2, 1]}, "start and end with 1"),
    ],
)
def test_foreign_or_damaged_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(FileFormatError, match=message) as error:
        load_hypernetwork(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({8: (collections.Counter(), {})}, path)
    with pytest.raises(FileFormatError, match="forbidden"):
        load_hypernetwork(path)


# --- .optim sidecars -------------------------------------------------------------------------


def _trained_once(network):
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    loss = sum((module(torch.ones(1, 2, 8)) ** 2).sum() for pair in network.pairs.values() for module in pair)
    loss.backward()
    optimizer.step()
    return optimizer


def test_optim_sidecar_round_trip_and_a1111_layout(tmp_path):
    network = create_hypernetwork("x", [8], make_options(), seed=0)
    optimizer = _trained_once(network)
    path = tmp_path / "x.pt"
    save_hypernetwork(network, path)
    sidecar = save_optimizer_sidecar(path, optimizer.state_dict(), "AdamW")
    assert sidecar == optimizer_sidecar_path(path) == tmp_path / "x.pt.optim"
    raw = torch.load(sidecar, weights_only=True)
    assert list(raw) == ["optimizer_name", "hash", "optimizer_state_dict"]
    assert raw["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert a1111_accepts(sidecar)
    saved = load_optimizer_sidecar(path)
    assert saved is not None and saved.name == "AdamW"
    resumed = torch.optim.AdamW(load_hypernetwork(path).train().parameters(), lr=1e-3)
    resumed.load_state_dict(saved.state_dict)
    for before, after in zip(optimizer.state.values(), resumed.state.values()):
        assert torch.equal(before["exp_avg"], after["exp_avg"])


def test_stale_or_missing_sidecar_means_a_fresh_optimizer(tmp_path, caplog):
    network = create_hypernetwork("x", [8], make_options(), seed=0)
    optimizer = _trained_once(network)
    path = tmp_path / "x.pt"
    assert load_optimizer_sidecar(path) is None
    save_hypernetwork(network, path)
    save_optimizer_sidecar(path, optimizer.state_dict())
    network.step = 99
    save_hypernetwork(network, path)  # the .pt changed, the sidecar did not
    with caplog.at_level(logging.WARNING):
        assert load_optimizer_sidecar(path) is None
    assert "Cannot resume from saved optimizer!" in caplog.text
    optimizer_sidecar_path(path).write_bytes(b"not a pickle")
    assert load_optimizer_sidecar(path) is None
