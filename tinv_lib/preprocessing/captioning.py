"""Captions for preprocessed images: made by a local image-to-text model, merged with the
caption a source image already has, and written either as a `.txt` sidecar or into the file name.

The model is any folder that transformers' image-text-to-text pipeline accepts (the task that
replaced "image-to-text" in transformers 5): BLIP, as in A1111, is the usual choice. Models are
read from a local folder only (`local_files_only=True`); nothing is downloaded.

Captions in file names follow A1111's first preprocess (docs/preprocess.md, "Captions"):
`00000-0-<caption>.png`,
characters the OS forbids removed (Windows `\\/:*?"<>|`, elsewhere `/`), and the caption cut at a
word boundary so the whole path fits 259 (Windows) or 1023 characters. We also drop control
characters, fold whitespace runs into one space, and keep the file name under 200 UTF-8 bytes:
Linux and macOS refuse names over 255 bytes, and the atomic writer adds a temporary suffix.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tinv_lib.common.errors import TinvError, first_line
from tinv_lib.common.quiet import quiet_transformers_loading

EXISTING_CAPTION_ACTIONS = ("ignore", "copy", "prepend", "append")
WINDOWS_INVALID = '\\/:*?"<>|'
POSIX_INVALID = "/"
WINDOWS_MAX_PATH = 259
POSIX_MAX_PATH = 1023
NAME_MAX_BYTES = 200


# ---------------------------------------------------------------------------------------------
# Caption text rules
# ---------------------------------------------------------------------------------------------


def merge_caption(generated: str, existing: str | None, action: str) -> str:
    """Combine a new caption with the source's existing one (A1111's existing-caption action).

    `ignore` drops the old caption; `copy` keeps it instead of the new one; `prepend` gives
    "old new"; `append` gives "new old". Without an old caption the new one is used as is.
    The result is stripped; an empty result means "write no caption".
    """
    if action not in EXISTING_CAPTION_ACTIONS:
        raise TinvError(f"unknown existing-caption action {action!r} (use {', '.join(EXISTING_CAPTION_ACTIONS)})")
    caption = generated
    if existing and action == "copy":
        caption = existing
    elif existing and action == "prepend":
        caption = f"{existing} {generated}"
    elif existing and action == "append":
        caption = f"{generated} {existing}"
    return caption.strip()


def _fits(text: str, max_chars: int, max_bytes: int) -> bool:
    return len(text) <= max_chars and len(text.encode("utf-8")) <= max_bytes


def filename_caption(caption: str, dest_dir: str | os.PathLike, prefix: str, windows: bool | None = None) -> str:
    """The part of `caption` that goes after `<prefix>-` in an output file name (may be "").

    Removes the characters the OS forbids and cuts at a word boundary so that
    `<dest_dir>/<prefix>-<caption>.png` fits the OS path limit (see module docstring). A single
    word longer than the limit is cut inside the word rather than dropped.
    """
    if windows is None:
        windows = platform.system() == "Windows"
    invalid, max_path = (WINDOWS_INVALID, WINDOWS_MAX_PATH) if windows else (POSIX_INVALID, POSIX_MAX_PATH)
    spaced = "".join(" " if ch.isspace() else ch for ch in caption)
    cleaned = "".join(ch for ch in spaced if ch not in invalid and ch.isprintable())
    words = cleaned.split()
    fixed = f"{prefix}-.png"
    max_chars = max_path - len(os.path.join(str(dest_dir), fixed))
    max_bytes = NAME_MAX_BYTES - len(fixed.encode("utf-8"))
    if max_chars <= 0 or max_bytes <= 0:
        return ""
    text = ""
    for word in words:
        candidate = f"{text} {word}" if text else word
        if not _fits(candidate, max_chars, max_bytes):
            break
        text = candidate
    if not text and words:
        text = words[0]
        while text and not _fits(text, max_chars, max_bytes):
            text = text[:-1]
    return text


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSettings:
    """How captions are generated. `model` is a local folder; `prompt` conditions the model
    (BLIP captions unconditionally with ""); tokens bound the generated length; `device` is
    "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; `threads` caps torch's CPU threads
    (set when several worker processes share the CPU)."""

    model: str
    prompt: str = ""
    min_tokens: int = 0
    max_tokens: int = 48
    device: str = "auto"
    threads: int | None = None


def check_caption_model(path: str | os.PathLike) -> Path:
    """Fail early, with one line, if `path` cannot be a local transformers model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise TinvError(
            f"--caption_model {folder}: not a folder (models are never downloaded; give the local "
            "folder of an image-to-text model such as BLIP, with config.json and weights)"
        )
    if not (folder / "config.json").is_file():
        raise TinvError(f"--caption_model {folder}: no config.json in this folder; not a transformers model")
    return folder


class Captioner:
    """A loaded image-to-text model that turns PIL images into caption strings."""

    def __init__(self, settings: CaptionSettings) -> None:
        folder = check_caption_model(settings.model)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            with quiet_transformers_loading():
                processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
                model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise TinvError(
                f"--caption_model {folder}: cannot load it as an image-to-text model ({first_line(error)})"
            ) from None
        self.settings = settings
        self.pipe = pipeline("image-text-to-text", model=model.eval(), processor=processor, device=device)

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """Greedy (deterministic) captions, one per image, prompt text removed."""
        if not images:
            return []
        generate: dict[str, Any] = {
            "max_new_tokens": self.settings.max_tokens,
            "min_new_tokens": self.settings.min_tokens,
            "do_sample": False,
            "num_beams": 1,
        }
        results = self.pipe(
            images=list(images),
            text=[self.settings.prompt] * len(images),
            generate_kwargs=generate,
            return_full_text=False,
        )
        captions = []
        for result in results:
            first = result[0] if isinstance(result, list) else result
            captions.append(str(first.get("generated_text", "")).strip())
        return captions


_CAPTIONERS: dict[CaptionSettings, Captioner] = {}


def get_captioner(settings: CaptionSettings) -> Captioner:
    """The process's captioner for `settings`, loaded on first use.

    Each `datasets.map` worker process loads its own copy the first time it has an image to
    caption, so a re-run with nothing left to do never pays for loading the model.
    """
    if settings not in _CAPTIONERS:
        _CAPTIONERS[settings] = Captioner(settings)
    return _CAPTIONERS[settings]
