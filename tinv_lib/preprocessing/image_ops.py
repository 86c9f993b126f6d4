"""Image geometry for preprocessing, with A1111's numbers (docs/preprocess.md).

Pure functions on PIL images and integers: colour-mode normalisation, "crop and resize",
splitting oversized images, and the auto-sized crop. Nothing here touches the disk, so every rule
can be tested on its own; `tinv_lib.preprocessing.folder` strings them together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Colour modes
# ---------------------------------------------------------------------------------------------


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth greyscale to 0..255.

    PIL's own `convert("L")` clips 16-bit values at 255, which turns most 16-bit scans white.
    "I;16*" is 16-bit by definition; "I" (32-bit int, also what some 16-bit PNGs open as) is
    treated as 16-bit when it exceeds 255; "F" is taken as 0..1 when it fits, else 0..255.
    """
    data = values.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and data.max(initial=0) > 255):
        data = data / 257.0
    elif mode == "F" and data.max(initial=0) <= 1.0:
        data = data * 255.0
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Return an 8-bit RGB copy of `image`, whatever its mode.

    A1111 calls `convert("RGB")`, which is right for RGB, L, CMYK, YCbCr and plain palettes but
    wrong for two cases we fix: transparent pixels (palette `transparency`, RGBA, LA) keep the
    colour hidden under them (often black), so we composite them over `background` instead; and
    16-bit / 32-bit / float greyscale is clipped, so we rescale it (see `_scale_to_uint8`).
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = _scale_to_uint8(np.asarray(image), image.mode)
        return Image.fromarray(grey).convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, background + (255,))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Default path: A1111 "crop and resize" (`images.resize_image`, resize mode 1)
# ---------------------------------------------------------------------------------------------


def fill_size(width: int, height: int, src_width: int, src_height: int) -> tuple[int, int]:
    """Size to which A1111 scales a `src` image so that it covers `width x height`.

    The side that is relatively too short is set to the target and the other follows by integer
    division, exactly as A1111 computes it (so our crops land on the same pixels).
    """
    if width / height > src_width / src_height:
        return width, src_height * width // src_width
    return src_width * height // src_height, height


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fill `width x height` (LANCZOS) and centre-crop: A1111's default preprocess path."""
    fill_w, fill_h = fill_size(width, height, image.width, image.height)
    resized = image.resize((fill_w, fill_h), resample=Image.Resampling.LANCZOS)
    left = fill_w // 2 - width // 2
    top = fill_h // 2 - height // 2
    return resized.crop((left, top, left + width, top + height))


# ---------------------------------------------------------------------------------------------
# Split oversized images (docs/preprocess.md, "Split oversized images")
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitPlan:
    """How one image is split: resized to `resized`, then tiles of the target size are cut along
    the long axis (`horizontal` means along x) at `offsets`."""

    resized: tuple[int, int]
    horizontal: bool
    offsets: list[int]


def split_offsets(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of A1111's overlapping tiles of size `tile` along a side of `length`.

    `N = ceil((L - T*o) / (T*(1 - o)))` tiles, tile `i` starting at `int(i * (L - T) / (N - 1))`,
    so the first tile touches the start, the last touches the end, and the rest are spread evenly.
    A single tile (A1111 would divide by zero) starts at 0.
    """
    count = math.ceil((length - tile * overlap) / (tile * (1.0 - overlap)))
    if count <= 1:
        return [0]
    step = (length - tile) / (count - 1)
    return [int(step * i) for i in range(count)]


def plan_split(
    src_width: int, src_height: int, width: int, height: int, threshold: float = 0.5, overlap: float = 0.2
) -> SplitPlan | None:
    """Decide whether A1111's "split oversized images" applies, and where to cut.

    The aspect mismatch `ratio` compares the image with the target (`(w*H)/(h*W)` for an image
    relatively taller than the target, the inverse otherwise). A1111 splits when `ratio < 1` and
    `ratio <= threshold`; threshold is clamped to 0..1 and overlap to 0..0.9 as in A1111.
    Returns None when the image is not split.
    """
    threshold = min(max(threshold, 0.0), 1.0)
    overlap = min(max(overlap, 0.0), 0.9)
    tall = src_height * width >= src_width * height
    ratio = (src_width * height) / (src_height * width) if tall else (src_height * width) / (src_width * height)
    if not (ratio < 1.0 and ratio <= threshold):
        return None
    if tall:
        length = src_height * width // src_width
        return SplitPlan((width, length), False, split_offsets(length, height, overlap))
    length = src_width * height // src_height
    return SplitPlan((length, height), True, split_offsets(length, width, overlap))


def split_image(image: Image.Image, width: int, height: int, plan: SplitPlan) -> Iterator[Image.Image]:
    """Cut `image` into the tiles of `plan` (resized with PIL's default BICUBIC, as A1111)."""
    resized = image.resize(plan.resized, resample=Image.Resampling.BICUBIC)
    for offset in plan.offsets:
        if plan.horizontal:
            yield resized.crop((offset, 0, offset + width, height))
        else:
            yield resized.crop((0, offset, width, offset + height))


# ---------------------------------------------------------------------------------------------
# Auto-sized crop (docs/preprocess.md, "Auto-sized crop")
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutosizeSettings:
    """A1111's "auto-sized crop" options; `objective` is "area" (Maximize area) or "error"."""

    min_dim: int = 384
    max_dim: int = 768
    min_area: int = 64 * 64
    max_area: int = 640 * 640
    objective: str = "area"
    threshold: float = 0.1


def aspect_error(src_width: int, src_height: int, width: int, height: int) -> float:
    """A1111's aspect error `1 - min(r, 1/r)` with `r = (iw/ih) / (w/h)`: 0 for a perfect match."""
    r = (src_width / src_height) / (width / height)
    return 1.0 - (r if r < 1 else 1.0 / r)


def choose_autosize(src_width: int, src_height: int, settings: AutosizeSettings) -> tuple[int, int] | None:
    """Pick the output size of the auto-sized crop, or None when no candidate fits.

    Candidates step by 64 from `min_dim` to `max_dim` on both sides, within the area bounds and
    the aspect-error threshold. "area" ranks by (area, -error), "error" by (-error, area); the
    first best candidate in (width, height) order wins, as with A1111's `max`.
    """
    best: tuple[int, int] | None = None
    best_key: tuple[float, float] | None = None
    sides = range(settings.min_dim, settings.max_dim + 1, 64)
    for w in sides:
        for h in sides:
            if not settings.min_area <= w * h <= settings.max_area:
                continue
            err = aspect_error(src_width, src_height, w, h)
            if err > settings.threshold:
                continue
            key = (w * h, -err) if settings.objective == "area" else (-err, w * h)
            if best_key is None or key > best_key:
                best, best_key = (w, h), key
    return best


def centre_crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop `image` to the aspect of `width x height` and resize to it with LANCZOS.

    The crop box is fractional (PIL's `resize(box=...)`), as A1111's `center_crop`, so no pixel
    is lost to rounding before the resample.
    """
    iw, ih = image.size
    if ih / height < iw / width:
        sw = width * ih / height
        box = ((iw - sw) / 2, 0.0, iw - (iw - sw) / 2, float(ih))
    else:
        sh = height * iw / width
        box = (0.0, (ih - sh) / 2, float(iw), ih - (ih - sh) / 2)
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, box=box)
