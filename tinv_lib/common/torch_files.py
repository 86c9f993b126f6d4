"""Reading and writing pickle-based files (`.pt`, `.bin`, `.ckpt`, `.optim`) safely.

Pickle can run any code while loading. Every pickle-based file the project reads goes through
`safe_torch_load`, which uses a restricted unpickler: only tensors, storages, plain containers,
numbers and strings (plus a few inert classes legitimate files are known to contain) can be
built; anything else is refused with a one-line error naming the file, before a single object
from it is constructed.

Files we write use `save_a1111_pt`: legacy (non-zip) serialization, because A1111's
restricted unpickler rejects the extra entries of PyTorch's zip format
(docs/formats.md, "Safe loading"), and an
atomic rename so a kill never leaves a truncated file.
"""

from __future__ import annotations

import os
import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from tinv_lib.common.atomic import atomic_path
from tinv_lib.common.errors import FileFormatError, UnsafeFileError, first_line


class InertObject:
    """Stand-in for a pickled class we accept but never instantiate (e.g. the old
    `torch.nn.ParameterDict` of rinongal-era embeddings, pytorch-lightning callbacks in LDM
    `.ckpt` files). It only stores the pickled state, so `obj._parameters` etc. stay readable."""

    dump_patches = False  # torch's legacy loader asks module classes for this

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value


_DTYPE_NAMES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
)

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): torch._utils._rebuild_device_tensor_from_numpy,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),
    ("torch.nn.modules.container", "ParameterDict"): InertObject,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): InertObject,
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): InertObject,
    ("argparse", "Namespace"): InertObject,
}
_ALLOWED.update({("torch", name): getattr(torch, name) for name in _DTYPE_NAMES})


def _numpy_global(module: str, name: str) -> Any | None:
    """numpy arrays and scalars (some checkpoints store a numpy `global_step`): rebuilt by
    numpy's own constructors from raw bytes, which cannot run code from the file."""
    allowed = {
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
    }
    if (module, name) in allowed:
        import numpy

        return getattr(numpy, name, None) or getattr(numpy.core.multiarray, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        import numpy.dtypes

        return getattr(numpy.dtypes, name, None)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in the allow-list; torch resolves storage classes itself."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None and module.startswith("numpy"):
            found = _numpy_global(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")
        return found


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


_restricted_pickle = types.ModuleType("tinv_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a `.pt`/`.bin`/`.ckpt`/`.optim` file onto the CPU without running code from it.

    Accepts both PyTorch serializations (zip and legacy). Raises `UnsafeFileError` if the file
    asks for a forbidden global, `FileFormatError` if it is not a readable torch file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Old pickled ParameterDicts carry their class source; ours is a stand-in, by design.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "forbidden" in message:
            raise UnsafeFileError(
                f"{path}: refused to load: {message} (only tensors and plain data are allowed; "
                "the file may be malicious)"
            ) from None
        raise FileFormatError(f"{path}: not a readable PyTorch file ({message})") from None
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError) as error:
        raise FileFormatError(f"{path}: not a readable PyTorch file ({first_line(error)})") from None


def save_a1111_pt(obj: Any, path: str | os.PathLike) -> None:
    """Save `obj` with legacy (non-zip) serialization, atomically.

    Legacy serialization is what A1111's safe unpickler accepts; `torch.load(weights_only=True)`
    (ComfyUI) reads it too, as long as `obj` holds only tensors and plain data.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp, _use_new_zipfile_serialization=False)
