"""Model and file hashes with A1111's definitions (docs/formats.md, "Hashes").

* `sha256_file`: full-file SHA-256 (A1111 `hashes.sha256`), cached by path, size and mtime so
  multi-GB checkpoints are read once.
* `short_hash`: first 10 hex of the sha256: the checkpoint "Model hash" of infotext and the
  `sd_checkpoint` field of every embedding / hypernetwork we write.
* `old_model_hash`: A1111's pre-2023 hash: sha256 of the 64 KiB at offset 1 MiB, 8 hex.
* Diffusers folders have no single file, so we define (and document in the README) the folder's
  sha256 as the sha256 of a manifest: one line `<relative path> <sha256>\n` per weight file
  (`*.safetensors`, `*.bin`, `*.ckpt`, `*.pt`), sorted by path. The old hash of a folder is the
  old hash of its UNet weight file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tinv_lib.common.atomic import atomic_write_text

_BLOCK = 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def _cache_file() -> Path:
    root = os.environ.get("TINV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tinv")
    return Path(root) / "hashes.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def sha256_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """Hex sha256 of a file (or of a diffusers folder's manifest, see module docstring)."""
    path = Path(path).resolve()
    if path.is_dir():
        return _sha256_folder(path)
    stat = path.stat()
    key = str(path)
    cache = _read_cache() if use_cache else {}
    entry = cache.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime") == stat.st_mtime:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    value = digest.hexdigest()
    if use_cache:
        cache[key] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": value}
        try:
            atomic_write_text(_cache_file(), json.dumps(cache, indent=1))
        except OSError:
            pass  # a read-only home must not stop hashing
    return value


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _sha256_folder(folder: Path) -> str:
    manifest = "".join(
        f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in _weight_files(folder)
    )
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def short_hash(path: str | os.PathLike) -> str:
    """A1111 checkpoint short hash: sha256[:10]."""
    return sha256_file(path)[:10]


def old_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-hex model hash: sha256 of 0x10000 bytes at offset 0x100000.

    For a diffusers folder: the old hash of its UNet weights file. "NOFILE" if missing, as A1111.
    """
    path = Path(path)
    if path.is_dir():
        unet = sorted((path / "unet").glob("*.safetensors")) + sorted((path / "unet").glob("*.bin"))
        if not unet:
            return "NOFILE"
        path = unet[0]
    try:
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def model_name(path: str | os.PathLike) -> str:
    """A1111's checkpoint `model_name`: the file stem (folder name for diffusers folders)."""
    path = Path(path)
    name = path.name if path.is_dir() else path.stem
    return name.replace("/", "_").replace("\\", "_")
