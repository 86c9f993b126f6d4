"""Test helpers for embeddings: a mirror of A1111's safe-unpickler check, sample embeddings.

`a1111_safe_check` re-implements the check A1111 runs before every `torch.load`
(`modules/safe.py`; docs/formats.md, "Safe loading") from its description: zip files may only hold
`<dir>/data.pkl`, `<dir>/data/<n>` and `<dir>/version`, with exactly one `data.pkl`; legacy files
are five pickles; every pickle is read by an unpickler that resolves only the globals in A1111's
allow-list and turns storages into empty placeholders. A file that fails it is a file A1111
refuses to load.
"""

from __future__ import annotations

import collections
import functools
import pickle
import re
import zipfile
from pathlib import Path

import numpy
import torch

from tinv_lib.embeddings import Embedding

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"

_A1111_ALLOWED = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch": {
        "FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
        "float32", "BFloat16Storage",
    },
    "torch.nn.modules.container": {"ParameterDict"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "_codecs": {"encode"},
    "__builtin__": {"set"},
}
_ZIP_NAME = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")


class A1111Refused(Exception):
    """A1111's check would refuse the file."""


class _A1111Unpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise A1111Refused(f"persistent id {saved_id[0]!r} is not a storage")
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if name not in _A1111_ALLOWED.get(module, ()):
            raise A1111Refused(f"global '{module}/{name}' is forbidden")
        if module == "collections":
            return getattr(collections, name)
        if module == "torch._utils":
            return getattr(torch._utils, name)
        if module == "torch":
            return getattr(torch, name)
        if module == "torch.nn.modules.container":
            return torch.nn.ParameterDict
        if module == "numpy":
            return getattr(numpy, name)
        if module == "numpy.core.multiarray":
            return getattr(numpy.core.multiarray, name)
        if module == "_codecs":
            return lambda text, encoding="latin1": text.encode(encoding)
        return set


def a1111_safe_check(path: str | Path) -> None:
    """Raise `A1111Refused` if A1111's `safe.py` check would refuse the file."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if not _ZIP_NAME.match(name):
                    raise A1111Refused(f"bad file inside {path}: {name}")
            pickles = [name for name in names if _DATA_PKL.match(name)]
            if len(pickles) != 1:
                raise A1111Refused(f"{len(pickles)} data.pkl entries in {path}")
            with archive.open(pickles[0]) as handle:
                _A1111Unpickler(handle).load()
        return
    with open(path, "rb") as handle:
        unpickler = _A1111Unpickler(handle)
        for _ in range(5):
            unpickler.load()


def special_values(count: int) -> torch.Tensor:
    """Float32 values that a lossy path would change: signed zero, subnormals, extremes."""
    values = torch.tensor(
        [-0.0, 1e-45, -1e-45, 1.1754943508222875e-38, 3.4028234663852886e38, -3.4028234663852886e38, 1 / 3, -2 / 7],
        dtype=torch.float32,
    )
    return values.repeat(count // values.numel() + 1)[:count]


def sample_embedding(name: str, kind: str = "sd1", vectors: int = 3, seed: int = 0) -> Embedding:
    """A random embedding with metadata; `kind` sd1 (768), sd2 (1024) or sdxl (768 + 1280)."""
    generator = torch.Generator().manual_seed(seed)

    def rows(width: int) -> torch.Tensor:
        matrix = torch.randn(vectors, width, generator=generator) * 0.05
        matrix[-1, :8] = special_values(8)
        return matrix

    data = {"clip_l": rows(768), "clip_g": rows(1280)} if kind == "sdxl" else rows(1024 if kind == "sd2" else 768)
    return Embedding(name, data, step=1234, sd_checkpoint="0123456789", sd_checkpoint_name="some-model")


def same_bits(a: torch.Tensor | dict, b: torch.Tensor | dict) -> bool:
    """Bit-for-bit equality (distinguishes -0.0 from 0.0), for tensors or SDXL dicts."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            same_bits(a[key], b[key]) for key in a
        )
    return a.dtype == b.dtype == torch.float32 and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


@functools.cache
def tiny_pipeline(arch: str):
    """A tiny pipeline per architecture, built once per test session and shared by the
    embedding/prompt/generation tests (which never modify it; tests that must modify one,
    e.g. diffusers' `load_textual_inversion`, build their own)."""
    from testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(arch)
