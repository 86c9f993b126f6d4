"""Where generated images go and what they are called: A1111's txt2img saving rules.

A1111 users know their outputs by these names (docs/generate.md, "Files"), so we keep them:

* samples in `outputs/txt2img-images/<YYYY-MM-DD>/` named `<5-digit counter>-<seed>.png`;
  without date folders the name is `<counter>-<seed>-<prompt>.png`;
* grids in `outputs/txt2img-grids/<YYYY-MM-DD>/` named `grid-<4-digit counter>.png`;
* each folder counts on from the highest number already in it, so re-runs never overwrite;
* every PNG carries its infotext as the `parameters` text chunk, and is written atomically.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tinv_lib.common.atomic import atomic_path
from tinv_lib.generation.infotext import png_info

INVALID_FILENAME_CHARS = '#<>:"/\\|?*\n\r\t'
MAX_FILENAME_PART = 128
_LEADING_NUMBER = re.compile(r"^(\d+)")


def sanitize_filename_part(text: str, replace_spaces: bool = False) -> str:
    """A1111's file-name cleaning: unsafe characters become `_`, no leading spaces, at most
    128 characters, no trailing spaces or dots (Windows drops those silently)."""
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate({ord(char): "_" for char in INVALID_FILENAME_CHARS})
    return text.lstrip(" ")[:MAX_FILENAME_PART].rstrip(" .")


def next_number(folder: Path, prefix: str = "") -> int:
    """One more than the highest counter among the files in `folder` named `<prefix><number>...`
    (0 in an empty or missing folder): A1111's sequence numbering."""
    highest = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            if name.startswith(prefix):
                match = _LEADING_NUMBER.match(name[len(prefix):])
                if match:
                    highest = max(highest, int(match[1]))
    return highest + 1


def save_png(image, path: Path, infotext: str) -> Path:
    """Write `image` as a PNG with its infotext, atomically (never a truncated file)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(infotext))
    return path


def grid_rows(count: int) -> int:
    """A1111's automatic grid shape: rows = round(sqrt(n)), never more than the images."""
    return max(1, min(count, round(math.sqrt(count))))


def image_grid(images: Sequence, rows: int | None = None):
    """Images side by side, row by row, on black (A1111's `image_grid`); all the size of the first."""
    from PIL import Image

    rows = rows or grid_rows(len(images))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), color="black")
    for index, image in enumerate(images):
        grid.paste(image, box=(index % cols * width, index // cols * height))
    return grid


@dataclass
class OutputFolders:
    """The sample and grid folders of a run, with A1111's names inside them."""

    samples: Path
    grids: Path
    date_dirs: bool = True

    def _folder(self, root: Path) -> Path:
        return root / datetime.date.today().isoformat() if self.date_dirs else root

    def sample_path(self, seed: int, prompt: str) -> Path:
        """`<counter>-<seed>.png`, or `<counter>-<seed>-<prompt>.png` without date folders."""
        folder = self._folder(self.samples)
        decoration = f"{seed}" if self.date_dirs else f"{seed}-{sanitize_filename_part(prompt)}".rstrip("-")
        number = next_number(folder)
        while True:
            path = folder / f"{number:05}-{decoration}.png"
            if not path.exists():
                return path
            number += 1

    def grid_path(self) -> Path:
        """`grid-<counter>.png` (4 digits)."""
        folder = self._folder(self.grids)
        number = next_number(folder, "grid-")
        while (folder / f"grid-{number:04}.png").exists():
            number += 1
        return folder / f"grid-{number:04}.png"

    def save_sample(self, image, seed: int, prompt: str, infotext: str) -> Path:
        """Save one generated image under its A1111 name."""
        return save_png(image, self.sample_path(seed, prompt), infotext)

    def save_grid(self, images: Sequence, infotext: str) -> Path:
        """Save the grid of a run (the infotext is the first image's, as in A1111)."""
        return save_png(image_grid(images), self.grid_path(), infotext)
