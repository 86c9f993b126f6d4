"""Embedding files in and out: A1111 `.pt`, single-key and SDXL `.safetensors`, diffusers
`{token: tensor}` `.bin`/`.safetensors`, FLUX.1 and SD3 files keyed per encoder (docs/formats.md,
"Embedding files", "FLUX.1 and SD3 files", "Safe loading").

Every reader returns an `Embedding`; every writer takes one. Reading follows A1111's decision
tree (docs/formats.md, "How A1111 reads an embedding file") so a file means here what it means
in A1111: `string_to_param` first (with the old
`ParameterDict` form), then the per-encoder dicts (`{clip_l, clip_g}`, and FLUX.1's and SD3's
with T5 vectors under `t5xxl` or `t5`), then any single-tensor dict. Writers emit the forms every
consumer accepts: the exact A1111 dict, `emb_params` or `clip_l`/`clip_g` (+ T5 under both
`t5xxl` and `t5`), always CPU float32, `.pt` in the legacy serialization A1111's safe unpickler
admits.

Image embeddings (`.png`/`.webp`) live in `image_embed.py`; `load_embedding` and
`save_embedding` dispatch to them by extension.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinv_lib.common.errors import FileFormatError, TinvError, first_line
from tinv_lib.common.torch_files import safe_torch_load, save_a1111_pt
from tinv_lib.common.training_folders import CHECKPOINT_MARKER
from tinv_lib.models.architecture import ARCHITECTURES, CLIP_G, CLIP_L, T5
from tinv_lib.models.hashes import sha256_file

EMBEDDED_IN_IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")  # A1111 reads embeddings hidden in these (lossless)
PICKLE_SUFFIXES = (".pt", ".bin")
EMBEDDING_SUFFIXES = PICKLE_SUFFIXES + (".safetensors",) + EMBEDDED_IN_IMAGE_SUFFIXES
METADATA_KEYS = ("step", "sd_checkpoint", "sd_checkpoint_name")

Vectors = torch.Tensor | dict[str, torch.Tensor]

# Per-encoder embeddings as files key them (docs/formats.md, "FLUX.1 and SD3 files"): the T5
# vectors are `t5xxl` to ComfyUI and `t5` to OneTrainer and diffusers, so both are written and
# either is read. OneTrainer adds `<key>_out` output embeddings (applied after the encoder),
# which have no meaning as input vectors and are skipped.
ENCODER_ORDER = (CLIP_L, CLIP_G, T5)  # order in files and in checksums
T5_FILE_KEYS = ("t5xxl", T5)
OUTPUT_KEYS = tuple(f"{key}_out" for key in ENCODER_ORDER)
KEYED_FORMS = {frozenset(arch.embedding_keys): arch.name for arch in ARCHITECTURES.values()
               if len(arch.encoders) > 1}  # {clip_l, clip_g}: sdxl, {clip_l, t5}: flux, all three: sd3


class NotAnEmbeddingError(FileFormatError):
    """The file is readable but holds no embedding (e.g. a plain preview picture)."""


@dataclass
class Embedding:
    """One textual-inversion embedding: its vectors and the metadata A1111 keeps with them.

    `vectors` is a float32 tensor `[n, d]` (SD1/SD2) or a dict by encoder: `{"clip_l": [n, 768],
    "clip_g": [n, 1280]}` (SDXL), `{"clip_l", "t5": [n, 4096]}` (FLUX.1), all three (SD3). `path` and `format` say where it was read from, which the
    file hash (`TI hashes`) and `inspect` need.
    """

    name: str
    vectors: Vectors
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    path: Path | None = None
    format: str | None = None
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def is_keyed(self) -> bool:
        """True for the per-encoder dict forms (SDXL, FLUX.1, SD3)."""
        return isinstance(self.vectors, dict)

    def _keys(self) -> list[str]:
        return [key for key in ENCODER_ORDER if key in self.vectors]

    @property
    def vector_count(self) -> int:
        """Prompt slots the embedding takes; for SDXL A1111 counts `clip_g` rows (else `clip_l`'s,
        else those of the one encoder it has)."""
        if isinstance(self.vectors, dict):
            return int(self.vectors[CLIP_G if CLIP_G in self.vectors else self._keys()[0]].shape[0])
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int | dict[str, int]:
        """Vector width: an int, or a dict by encoder (`{clip_l: .., clip_g: ..}` for SDXL)."""
        if isinstance(self.vectors, dict):
            return {key: int(self.vectors[key].shape[-1]) for key in self._keys()}
        return int(self.vectors.shape[-1])

    @property
    def width(self) -> int:
        """The single number A1111 compares with the model (SDXL: both widths summed)."""
        dim = self.dim
        return sum(dim.values()) if isinstance(dim, dict) else dim

    def vector_counts(self) -> int | dict[str, int]:
        """Rows per encoder (keyed forms) or the row count, for `inspect`."""
        if isinstance(self.vectors, dict):
            return {key: int(self.vectors[key].shape[0]) for key in self._keys()}
        return self.vector_count

    def checksum(self) -> str:
        """A1111's 4-hex `Embedding.checksum` (docs/formats.md, "Hashes"), used to match `.optim` sidecars.

        For the keyed forms (which A1111 cannot checksum) the `clip_l`, `clip_g`, `t5` rows it
        has are hashed as one sequence in that order.
        """
        if isinstance(self.vectors, dict):
            flat = torch.cat([self.vectors[key].detach().reshape(-1) for key in self._keys()])
        else:
            flat = self.vectors.detach().reshape(-1)
        return checksum_of(flat)

    @property
    def sha256(self) -> str | None:
        """sha256 of the file the embedding was read from (None if it was not read from one)."""
        if self._sha256 is None and self.path is not None and self.path.is_file():
            self._sha256 = sha256_file(self.path, use_cache=False)
        return self._sha256

    @property
    def shorthash(self) -> str | None:
        """A1111's TI shorthash (sha256[:12]) for the infotext `TI hashes` field."""
        return self.sha256[:12] if self.sha256 else None


def checksum_of(values: torch.Tensor) -> str:
    """A1111's checksum over flat values: scale by 100 in float32, fold with 281/997, 16 bits.

    A value that overflows to infinity when scaled (A1111 would crash on it) counts as 0.
    """
    result = 0
    for value in (values.to(torch.float32) * 100).tolist():
        whole = int(value) if math.isfinite(value) else 0
        result = ((result * 281) ^ (whole * 997)) & 0xFFFFFFFF
    return f"{result & 0xFFFF:04x}"


# ------------------------------------------------------------------------------- interpreting


def _as_float32(tensor: Any, where: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise FileFormatError(f"{where}: embedding vectors are not a floating-point tensor")
    if not torch.isfinite(tensor).all():
        raise FileFormatError(f"{where}: embedding vectors contain NaN or infinity")
    return tensor.detach().to("cpu", torch.float32).contiguous()


def _as_matrix(tensor: Any, where: str) -> torch.Tensor:
    """Float32 `[n, d]`; a 1-D tensor (old diffusers concepts) becomes one row, as in A1111."""
    tensor = _as_float32(tensor, where)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise FileFormatError(f"{where}: embedding tensor has shape {list(tensor.shape)}, expected [vectors, width]")
    return tensor


def _optional_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    return None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def metadata_from_dict(data: dict) -> dict[str, Any]:
    """`step`, `sd_checkpoint`, `sd_checkpoint_name` from a dict (None when absent or ill-typed)."""
    return {
        "step": _optional_int(data.get("step")),
        "sd_checkpoint": _optional_str(data.get("sd_checkpoint")),
        "sd_checkpoint_name": _optional_str(data.get("sd_checkpoint_name")),
    }


def embedding_from_data(data: Any, name: str, where: str = "embedding") -> Embedding:
    """Interpret a loaded dict as A1111 does (docs/formats.md, "How A1111 reads an embedding
    file"), returning an `Embedding`.

    `name` is the name to use (A1111: the file stem; for images the name stored inside). The
    `format` of the result names the layout (`a1111`, `a1111-parameterdict`, `sdxl`, `flux`,
    `sd3`, `emb_params`, `diffusers`); callers add the container.
    """
    if not isinstance(data, dict):
        raise FileFormatError(f"{where}: not an embedding (the file holds a {type(data).__name__}, not a dict)")
    data = _without_output_embeddings(data, where)
    if "string_to_param" in data:
        params = data["string_to_param"]
        layout = "a1111"
        if hasattr(params, "_parameters"):  # pickled torch.nn.ParameterDict (rinongal era)
            params, layout = params._parameters, "a1111-parameterdict"
        if not isinstance(params, dict) or len(params) != 1:
            raise FileFormatError(f"{where}: embedding file has multiple terms in it (or none)")
        vectors: Vectors = _as_matrix(next(iter(params.values())), where)
    elif (keyed := _keyed_vectors(data, where)) is not None:
        layout, vectors = keyed
    elif data and isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            raise FileFormatError(
                f"{where}: {len(data)} tensors ({', '.join(map(str, list(data)[:4]))}...) where an "
                "embedding file holds one"
            )
        key = next(iter(data))
        layout = "emb_params" if key == "emb_params" else "diffusers"
        vectors = _as_matrix(data[key], where)
    else:
        raise FileFormatError(f"{where}: neither a textual-inversion embedding nor a diffusers concept")
    return Embedding(name=name, vectors=vectors, format=layout, **metadata_from_dict(data))


def _without_output_embeddings(data: dict, where: str) -> dict:
    """`data` without OneTrainer's `*_out` output embeddings; a file holding nothing else is
    refused, since output embeddings replace the encoder's output and cannot be prompt vectors."""
    outputs = [key for key in OUTPUT_KEYS if key in data]
    if not outputs:
        return data
    rest = {key: value for key, value in data.items() if key not in outputs}
    if not any(isinstance(value, torch.Tensor) for value in rest.values()):
        raise FileFormatError(
            f"{where}: holds only output embeddings ({', '.join(outputs)}: OneTrainer's, applied after the "
            f"text encoder), not the input vectors tinv reads ({', '.join(ENCODER_ORDER)})"
        )
    return rest


def _keyed_vectors(data: dict, where: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """`(layout, {key: [n, d]})` when `data` holds one of the per-encoder forms (the largest
    one it holds: SD3's over SDXL's), else None. T5 vectors may be under `t5xxl` or `t5`."""
    found = {key: data[key] for key in (CLIP_L, CLIP_G) if key in data}
    t5_keys = [key for key in T5_FILE_KEYS if key in data]
    if t5_keys:
        found[T5] = data[t5_keys[0]]
    if len(t5_keys) == 2 and not (isinstance(found[T5], torch.Tensor) and isinstance(data[T5], torch.Tensor)
                                  and torch.equal(found[T5], data[T5])):
        raise FileFormatError(f"{where}: `t5xxl` and `t5` hold different vectors; which T5 vectors are meant?")
    for form in sorted(KEYED_FORMS, key=len, reverse=True):
        if form <= set(found):
            vectors = {key: _as_matrix(found[key], f"{where} [{key}]") for key in ENCODER_ORDER if key in form}
            return KEYED_FORMS[form], vectors
    tensors = {key for key, value in data.items() if isinstance(value, torch.Tensor)}
    if len(found) == 1 and tensors <= {CLIP_L, CLIP_G, *T5_FILE_KEYS}:
        # one encoder's vectors alone (a CLIP-only FLUX.1 file: `clip_l`): keyed, so that a
        # FLUX.1/SD3 model puts them in that encoder (a one-encoder model takes them as A1111 does)
        key = next(iter(found))
        return f"{key}-only", {key: _as_matrix(found[key], f"{where} [{key}]")}
    return None


# ------------------------------------------------------------------------------- reading


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise FileFormatError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    return tensors, metadata


def _metadata_from_header(metadata: dict[str, str]) -> dict[str, Any]:
    """Our metadata keys from a safetensors header (values there are always strings)."""
    found: dict[str, Any] = {key: metadata[key] for key in METADATA_KEYS if metadata.get(key)}
    if "step" in found:
        found["step"] = _optional_int(found["step"])
    return found


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read any embedding file we know, by extension (docs/formats.md, "How A1111 reads an embedding file").

    Names: the file stem for `.pt`/`.bin`/`.safetensors`; the name stored inside for images.
    Raises `FileFormatError` (one line) for unknown, damaged or non-embedding files and
    `UnsafeFileError` for pickles that ask for forbidden code.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    if suffix in EMBEDDED_IN_IMAGE_SUFFIXES:
        from tinv_lib.embeddings.image_embed import load_image_embedding

        embedding = load_image_embedding(path)
    elif suffix in PICKLE_SUFFIXES:
        with warnings.catch_warnings():  # legacy pickles of nn containers compare module sources
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            data = safe_torch_load(path)
        embedding = embedding_from_data(data, path.stem, str(path))
        embedding.format = f"{embedding.format}-{suffix[1:]}"
    elif suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        if CHECKPOINT_MARKER in metadata:
            raise NotAnEmbeddingError(f"{path}: a training checkpoint's state, not an embedding (the embedding is "
                                      "the .pt or .safetensors file the run saved beside its checkpoints)")
        data: dict[str, Any] = dict(tensors)
        embedding = embedding_from_data(data, path.stem, str(path))
        for key, value in _metadata_from_header(metadata).items():
            setattr(embedding, key, value)
        embedding.format = f"{embedding.format}-safetensors"
    else:
        raise FileFormatError(
            f"{path}: unknown embedding file type {suffix or '(none)'!r} "
            f"(known: {', '.join(EMBEDDING_SUFFIXES)})"
        )
    embedding.path = path
    return embedding


# ------------------------------------------------------------------------------- writing


def _cpu_float32(vectors: Vectors) -> Vectors:
    """Detached, contiguous CPU float32 copies: what every consumer expects on disk."""
    if isinstance(vectors, dict):
        if frozenset(vectors) not in KEYED_FORMS:
            forms = ", ".join(" + ".join(key for key in ENCODER_ORDER if key in form) for form in KEYED_FORMS)
            raise TinvError(f"embedding vectors for {', '.join(vectors) or 'no encoder'}: not a known form ({forms})")
        return {key: vectors[key].detach().to("cpu", torch.float32).contiguous().clone()
                for key in ENCODER_ORDER if key in vectors}
    if vectors.dim() != 2:
        raise TinvError(f"embedding vectors must be [vectors, width], got shape {list(vectors.shape)}")
    return vectors.detach().to("cpu", torch.float32).contiguous().clone()


def _file_tensors(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-encoder vectors keyed as files carry them: T5's under both `t5xxl` and `t5` (separate
    copies: safetensors refuses tensors that share memory); SDXL's unchanged."""
    tensors = {key: value for key, value in vectors.items() if key != T5}
    if T5 in vectors:
        tensors.update({key: vectors[T5].clone() for key in T5_FILE_KEYS})
    return tensors


def a1111_dict(embedding: Embedding) -> dict[str, Any]:
    """The exact A1111 `.pt` dict (docs/formats.md, "The A1111 `.pt` dict"), keys in A1111's order."""
    if embedding.is_keyed:
        raise TinvError("the A1111 string_to_param dict holds one encoder; SDXL, FLUX.1 and SD3 files are keyed "
                        "by encoder")
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": _cpu_float32(embedding.vectors)},
        "name": str(embedding.name),
        "step": None if embedding.step is None else int(embedding.step),
        "sd_checkpoint": None if embedding.sd_checkpoint is None else str(embedding.sd_checkpoint),
        "sd_checkpoint_name": None if embedding.sd_checkpoint_name is None else str(embedding.sd_checkpoint_name),
    }


def _safetensors_metadata(embedding: Embedding) -> dict[str, str]:
    """Header metadata: our fields as strings, plus `format: pt` (diffusers' loaders expect it),
    always in this order (`format`, `name`, then `METADATA_KEYS`; see `_fixed_metadata_order`)."""
    metadata = {"format": "pt", "name": str(embedding.name)}
    for key in METADATA_KEYS:
        value = getattr(embedding, key)
        if value is not None:
            metadata[key] = str(value)
    return metadata


def _fixed_metadata_order(data: bytes, metadata: dict[str, str]) -> bytes:
    """The safetensors file `data` with its header metadata in `metadata`'s order.

    safetensors writes the metadata from a Rust hash map, in an order that changes from one
    write to the next, so the same embedding saved twice (by training, then by `convert` from
    its `.pt`) gave two different files. The header is rewritten as safetensors writes it
    (compact JSON, metadata first, space-padded to a multiple of 8 bytes); the tensor data
    after it is untouched, since its offsets are relative to the end of the header."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header.pop("__metadata__", None)
    text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_pt(embedding: Embedding, path: str | os.PathLike) -> Path:
    """Write an A1111 `.pt`: A1111's dict (SD1/SD2) or the per-encoder dict (SDXL `{clip_l,
    clip_g}`; FLUX.1 and SD3 add T5 under `t5xxl` and `t5`).

    Legacy serialization and plain data only, so A1111's restricted unpickler and
    `torch.load(weights_only=True)` (ComfyUI) both accept it. Keyed files carry no metadata:
    A1111 converts every value of a `{clip_l, clip_g}` dict to a tensor.
    """
    path = Path(path)
    obj = _file_tensors(_cpu_float32(embedding.vectors)) if embedding.is_keyed else a1111_dict(embedding)
    save_a1111_pt(obj, path)
    return path


def save_safetensors(embedding: Embedding, path: str | os.PathLike, layout: str = "emb_params") -> Path:
    """Write `.safetensors`: `{"emb_params": [n, d]}` (layout `emb_params`, kohya/A1111),
    `{name: [n, d]}` (layout `diffusers`), or the per-encoder dict (SDXL, FLUX.1, SD3); with metadata."""
    from safetensors.torch import save

    from tinv_lib.common.atomic import atomic_write_bytes

    path = Path(path)
    vectors = _cpu_float32(embedding.vectors)
    if isinstance(vectors, dict):
        tensors = _file_tensors(vectors)
    elif layout == "emb_params":
        tensors = {"emb_params": vectors}
    elif layout == "diffusers":
        tensors = {str(embedding.name): vectors}
    else:
        raise TinvError(f"unknown safetensors layout {layout!r} (emb_params or diffusers)")
    metadata = _safetensors_metadata(embedding)
    atomic_write_bytes(path, _fixed_metadata_order(save(tensors, metadata=metadata), metadata))
    return path


def save_bin(embedding: Embedding, path: str | os.PathLike) -> Path:
    """Write a diffusers-style `.bin`: `{name: [n, d]}` (keyed forms: by encoder), legacy pickle."""
    path = Path(path)
    vectors = _cpu_float32(embedding.vectors)
    save_a1111_pt(_file_tensors(vectors) if isinstance(vectors, dict) else {str(embedding.name): vectors}, path)
    return path


def save_embedding(embedding: Embedding, path: str | os.PathLike, **options: Any) -> Path:
    """Write `embedding` in the format its extension names: `.pt`, `.safetensors`, `.bin`, `.png`.

    `options` go to the specific writer (`layout=` for safetensors; `image=`, `caption=` for PNG).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return save_pt(embedding, path)
    if suffix == ".safetensors":
        return save_safetensors(embedding, path, **options)
    if suffix == ".bin":
        return save_bin(embedding, path)
    if suffix == ".png":
        from tinv_lib.embeddings.image_embed import save_png_embedding

        return save_png_embedding(embedding, path, **options)
    raise TinvError(f"{path}: cannot write embeddings as {suffix or '(no extension)'!r} (use .pt, .safetensors, .bin or .png)")
