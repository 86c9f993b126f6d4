"""Reading image files: one reader, one set of rules, for training images, loss masks and
preprocessing sources.

A file is decoded fully (a truncated file fails here, not halfway through training), turned
upright by its EXIF orientation (a damaged EXIF block keeps the pixels as stored) and returned in
its own mode, so the alpha channel stays for whoever wants it. Every failure is one
`UnreadableImage` with a reason a summary can count: PIL's decoders raise many exception types on
damaged input, and one bad file must never stop a run.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from tinv_lib.common.errors import TinvError, first_line

# what a folder of training images lists as images (preprocessing tries every file, as A1111)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
NOT_AN_IMAGE = "not an image"
UNREADABLE = "unreadable"


class UnreadableImage(TinvError):
    """A file PIL does not recognise (`reason` NOT_AN_IMAGE) or cannot decode (UNREADABLE, with
    the decoder's first line as `detail`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


def read_image(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """The image in `source`, fully decoded and upright, in its own mode; `UnreadableImage` if not."""
    try:
        with Image.open(source) as opened:
            opened.load()
            try:
                return ImageOps.exif_transpose(opened)
            except Exception:  # noqa: BLE001 - a damaged EXIF block: keep the pixels as stored
                return opened.copy()
    except UnidentifiedImageError:
        raise UnreadableImage(NOT_AN_IMAGE) from None
    except Exception as error:  # noqa: BLE001 - see the module docstring
        raise UnreadableImage(UNREADABLE, first_line(error)) from None
