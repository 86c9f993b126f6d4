"""Hypernetwork `.pt` files and their `.optim` sidecars, as A1111 writes and reads them.

The file is a plain dict (docs/formats.md, "Layout and metadata"): integer context widths mapping to a tuple
`(k_state_dict, v_state_dict)`, then the metadata keys in A1111's order. We write it with
legacy serialization (A1111's restricted unpickler rejects torch's zip extras: docs/formats.md,
"Safe loading") and only
plain data, so ComfyUI's `torch.load(weights_only=True)` reads it too.

Reading accepts everything A1111 reads: old files without metadata keys get A1111's old
defaults (notably `activate_output=True`), and NAI-era `linear1`/`linear2` keys are renamed.
Every pickle goes through `safe_torch_load`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinv_lib.common.errors import FileFormatError, TinvError
from tinv_lib.common.torch_files import safe_torch_load, save_a1111_pt
from tinv_lib.hypernetworks.module import (
    Hypernetwork,
    HypernetworkModule,
    HypernetworkOptions,
    default_dropout_structure,
)
from tinv_lib.models.architecture import SINGLE_KEY
from tinv_lib.models.hashes import old_model_hash, short_hash

logger = logging.getLogger(__name__)

_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def _state_dict_for_file(module: HypernetworkModule) -> OrderedDict:
    """The module's state dict with CPU float32 tensors; the `_metadata` torch attaches (which
    A1111 files carry too) is kept, so our files have A1111's structure."""
    state = module.state_dict()
    for key, tensor in state.items():
        state[key] = tensor.detach().to("cpu", torch.float32)
    return state


def hypernetwork_to_dict(network: Hypernetwork) -> dict:
    """The object `Hypernetwork.save` pickles: sizes first, then every metadata key in
    A1111's order. `last_layer_dropout` is derived from the structure, as A1111 does."""
    options = network.options
    data: dict[Any, Any] = {}
    for size in network.sizes:
        key_module, value_module = network.modules_for(size)
        data[size] = (_state_dict_for_file(key_module), _state_dict_for_file(value_module))
    data["step"] = int(network.step)
    data["name"] = str(network.name)
    data["layer_structure"] = list(options.layer_structure)
    data["activation_func"] = options.activation_func
    data["is_layer_norm"] = bool(options.add_layer_norm)
    data["weight_initialization"] = options.weight_init
    data["sd_checkpoint"] = _optional_str(network.sd_checkpoint)
    data["sd_checkpoint_name"] = _optional_str(network.sd_checkpoint_name)
    data["activate_output"] = bool(options.activate_output)
    data["use_dropout"] = bool(options.use_dropout)
    data["dropout_structure"] = list(options.dropout_structure)
    data["last_layer_dropout"] = bool(options.dropout_structure[-2] != 0)
    data["optional_info"] = _optional_str(network.optional_info) or None
    return data


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def save_hypernetwork(network: Hypernetwork, path: str | os.PathLike) -> None:
    """Write `network` as an A1111 `.pt`, atomically (a kill never leaves a truncated file)."""
    path = Path(path)
    if path.suffix != ".pt":
        raise TinvError(f"{path}: hypernetworks are saved as .pt (A1111 and ComfyUI read only .pt)")
    save_a1111_pt(hypernetwork_to_dict(network), path)


def options_from_file(data: Mapping) -> HypernetworkOptions:
    """The architecture a file describes, with A1111 `load()`'s defaults for missing keys.

    Old defaults: `[1, 2, 1]`, no activation, no LayerNorm, `activate_output=True` (before
    PR #3698 the last layer was activated), and the Dec-2022 dropout rule when the file has
    no `dropout_structure`. A non-zero dropout structure forces `use_dropout` on.
    """
    layer_structure = data.get("layer_structure", [1, 2, 1])
    dropout = data.get("dropout_structure", None)
    if not isinstance(layer_structure, (list, tuple)) or not isinstance(dropout, (list, tuple, type(None))):
        raise TinvError("damaged metadata: layer_structure / dropout_structure are not lists")
    use_dropout = bool(dropout is not None and any(dropout)) or bool(data.get("use_dropout", False))
    if dropout is None:
        dropout = default_dropout_structure(
            layer_structure, use_dropout, bool(data.get("last_layer_dropout", False))
        )
    return HypernetworkOptions(
        layer_structure=list(layer_structure),
        activation_func=data.get("activation_func", None),
        weight_init=data.get("weight_initialization", "Normal"),
        add_layer_norm=bool(data.get("is_layer_norm", False)),
        activate_output=bool(data.get("activate_output", True)),
        use_dropout=use_dropout,
        dropout_structure=list(dropout),
    )


def _size_keys(data: Mapping) -> list[int]:
    """The context widths in file order: int keys (A1111), or digit strings (some converters)."""
    sizes = []
    for key in data:
        if isinstance(key, int) and not isinstance(key, bool):
            sizes.append(key)
        elif isinstance(key, str) and key.isdigit():
            sizes.append(int(key))
    return sizes


def _renamed_legacy_keys(state: Mapping) -> dict:
    """A1111's `fix_old_state_dict`: NAI-style `linear1`/`linear2` become `linear.0`/`linear.1`."""
    return {_LEGACY_KEYS.get(key, key): value for key, value in state.items()}


def _load_module(size: int, state: object, options: HypernetworkOptions, label: str) -> HypernetworkModule:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TinvError(f"size {size} {label}: expected a state dict of tensors")
    module = HypernetworkModule(size, options, init_weights=False)
    try:
        module.load_state_dict(_renamed_legacy_keys(state), strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise TinvError(
            f"size {size} {label}: weights do not fit the structure the file describes ({detail})"
        ) from None
    return module


def hypernetwork_from_dict(data: object, default_name: str) -> Hypernetwork:
    """Build a Hypernetwork (eval mode, CPU, float32) from a loaded `.pt` object.

    Raises `TinvError` with a one-line reason if the object is not a hypernetwork.
    """
    if not isinstance(data, Mapping):
        raise TinvError(f"not a hypernetwork file (holds a {type(data).__name__}, not a dict)")
    if "string_to_param" in data or SINGLE_KEY in data:
        raise TinvError("this is a textual-inversion embedding, not a hypernetwork")
    sizes = _size_keys(data)
    if not sizes:
        raise TinvError("not a hypernetwork file (no integer context-width keys)")
    options = options_from_file(data)
    options.validate_structure()
    network = Hypernetwork(str(data.get("name") or default_name), options)
    for size in sizes:
        pair = data[size] if size in data else data[str(size)]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TinvError(f"size {size}: expected a (k, v) pair of state dicts")
        network.add_size(
            size, _load_module(size, pair[0], options, "k"), _load_module(size, pair[1], options, "v")
        )
    network.step = _int_or(data.get("step"), 0)
    network.sd_checkpoint = _optional_str(data.get("sd_checkpoint"))
    network.sd_checkpoint_name = _optional_str(data.get("sd_checkpoint_name"))
    network.optional_info = _optional_str(data.get("optional_info"))
    return network.eval()


def _int_or(value: object, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def load_hypernetwork(path: str | os.PathLike) -> Hypernetwork:
    """Load an A1111 hypernetwork `.pt` (any A1111 era) safely; name defaults to the stem.

    Raises `FileFormatError` (one line, naming the file) for unsafe, damaged or foreign files.
    """
    path = Path(path)
    data = safe_torch_load(path)
    try:
        return hypernetwork_from_dict(data, path.stem)
    except FileFormatError:
        raise
    except TinvError as error:
        raise FileFormatError(f"{path}: {error}") from None


# --- optimizer sidecars (`<file>.pt.optim`) -------------------------------------------------


@dataclass
class SavedOptimizer:
    """An optimizer state read from a sidecar whose hash matched its `.pt`."""

    name: str
    state_dict: dict


def optimizer_sidecar_path(pt_path: str | os.PathLike) -> Path:
    """A1111's sidecar name: the `.pt` file name plus `.optim`."""
    return Path(f"{os.fspath(pt_path)}.optim")


def _to_cpu(value: Any) -> Any:
    """Optimizer states may hold device tensors; files must hold CPU tensors
    (docs/formats.md, "Rules for every `.pt` written")."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def save_optimizer_sidecar(
    pt_path: str | os.PathLike, optimizer_state_dict: dict, optimizer_name: str = "AdamW"
) -> Path:
    """Write `<pt_path>.optim` for the `.pt` already written at `pt_path`.

    The `hash` is the sha256[:10] of that `.pt`, which is what A1111 compares on load. (A1111
    itself hashes the file it originally loaded, so its intermediate copies rarely match; ours
    always describe the file next to them.) Call it after every save of the `.pt`.
    """
    sidecar = optimizer_sidecar_path(pt_path)
    data = {
        "optimizer_name": str(optimizer_name),
        "hash": short_hash(pt_path),
        "optimizer_state_dict": _to_cpu(optimizer_state_dict),
    }
    save_a1111_pt(data, sidecar)
    return sidecar


def load_optimizer_sidecar(pt_path: str | os.PathLike) -> SavedOptimizer | None:
    """The optimizer state saved next to `pt_path`, or None (with a log line saying why).

    As in A1111, a missing, unreadable or stale sidecar (hash differs from the `.pt`'s
    sha256[:10]; old builds' 8-hex old hash is accepted too) only means training resumes with a
    fresh optimizer: it is not an error.
    """
    sidecar = optimizer_sidecar_path(pt_path)
    if not sidecar.exists():
        logger.info("%s: no saved optimizer state; starting a new optimizer", pt_path)
        return None
    try:
        data = safe_torch_load(sidecar)
    except FileFormatError as error:
        logger.warning("Cannot resume from saved optimizer! %s", error)
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("optimizer_state_dict"), Mapping):
        logger.warning("Cannot resume from saved optimizer! %s holds no optimizer_state_dict", sidecar)
        return None
    saved_hash = data.get("hash")
    if saved_hash not in (short_hash(pt_path), old_model_hash(pt_path)):
        logger.warning(
            "Cannot resume from saved optimizer! %s was written for another version of %s "
            "(hash %s, file is %s)", sidecar, Path(pt_path).name, saved_hash, short_hash(pt_path),
        )
        return None
    return SavedOptimizer(str(data.get("optimizer_name") or "AdamW"), dict(data["optimizer_state_dict"]))
