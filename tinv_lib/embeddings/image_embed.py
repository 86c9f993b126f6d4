"""Embeddings carried by images, as A1111's training previews carry them
(docs/formats.md, "PNG embeddings").

A1111 writes two independent copies of the embedding into one PNG, and so do we:

* (a) a `tEXt` chunk `sd-ti-embedding`: Base64 of the JSON of the `.pt` dict, tensors written
  as `{"TORCHTENSOR": nested lists}`;
* (b) the same JSON, zlib-compressed, split into nibbles and painted as two pixel blocks left
  and right of the picture, scrambled with an LCG. This copy survives tools that strip text
  chunks (and formats without them, e.g. lossless WebP).

The reader prefers (a) and falls back to (b). The picture gets A1111's caption overlay (name,
model, hash, vectors and steps); it is cosmetic, no reader looks at it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from tinv_lib.common.errors import TinvError
from tinv_lib.embeddings.formats import (
    METADATA_KEYS,
    Embedding,
    FileFormatError,
    NotAnEmbeddingError,
    a1111_dict,
    embedding_from_data,
    metadata_from_dict,
)

TEXT_CHUNK_KEY = "sd-ti-embedding"
# Our own chunk for SDXL metadata: A1111 turns every value of a {clip_l, clip_g} dict into a
# tensor, so step and checkpoint cannot travel inside that payload.
META_CHUNK_KEY = "tinv-embedding-meta"
_MAX_PAYLOAD = 512 * 1024 * 1024  # refuse zlib bombs
_CHANNELS = 3

# ------------------------------------------------------------------------------- the LCG

_LCG_A, _LCG_C, _LCG_MASK = 1664525, 1013904223, 0xFFFFFFFF
_LCG_BLOCK = 4096


def lcg_outputs(count: int) -> np.ndarray:
    """The first `count` outputs of A1111's generator: state' = (1664525·state + 1013904223)
    mod 2^32 from state 0, output state' mod 255 (sic, not 256).

    Computed in blocks: the first block by the recurrence, each later block from the one before
    it with the block's composed affine map (a^m, c·(a^m−1)/(a−1) mod 2^32), so long streams
    cost numpy operations instead of a Python loop.
    """
    states = np.empty(count, dtype=np.uint64)
    state = 0
    for index in range(min(count, _LCG_BLOCK)):
        state = (_LCG_A * state + _LCG_C) & _LCG_MASK
        states[index] = state
    multiplier, offset = 1, 0
    for _ in range(_LCG_BLOCK):
        multiplier, offset = (_LCG_A * multiplier) & _LCG_MASK, (_LCG_A * offset + _LCG_C) & _LCG_MASK
    mul, add = np.uint64(multiplier), np.uint64(offset)
    for start in range(_LCG_BLOCK, count, _LCG_BLOCK):
        previous = states[start - _LCG_BLOCK : min(start, count - _LCG_BLOCK)]
        states[start : start + previous.shape[0]] = (previous * mul + add) & np.uint64(_LCG_MASK)
    return (states % np.uint64(255)).astype(np.int64)


def _scramble(block: np.ndarray) -> np.ndarray:
    """XOR a block (C order) with the low nibble of a fresh LCG stream; its own inverse."""
    stream = (lcg_outputs(block.size) & 0x0F).astype(np.uint8).reshape(block.shape)
    return block ^ stream


# ------------------------------------------------------------------------------- JSON payload


def _tensor_to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"TORCHTENSOR": value.detach().cpu().tolist()}
    raise TypeError(f"cannot store {type(value).__name__} in an image embedding")


def _json_to_tensor(obj: dict) -> Any:
    if "TORCHTENSOR" in obj:
        try:
            return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise FileFormatError(f"bad tensor in embedding data ({error})") from None
    return obj


def payload_json(data: dict) -> bytes:
    """The JSON A1111 stores: `json.dumps` defaults, tensors as TORCHTENSOR nested lists."""
    return json.dumps(data, default=_tensor_to_json).encode("utf-8")


def parse_payload_json(raw: bytes) -> Any:
    """Inverse of `payload_json`; tensors come back float64, as in A1111."""
    try:
        return json.loads(raw, object_hook=_json_to_tensor)
    except (ValueError, UnicodeDecodeError) as error:
        raise FileFormatError(f"embedding data is not valid JSON ({str(error)[:80]})") from None


def text_chunk_value(data: dict) -> str:
    """The `sd-ti-embedding` chunk value: Base64 of the payload JSON."""
    return base64.b64encode(payload_json(data)).decode("ascii")


def data_from_text_chunk(value: str) -> Any:
    """Decode an `sd-ti-embedding` chunk value."""
    try:
        raw = base64.b64decode(value, validate=False)
    except (ValueError, TypeError) as error:
        raise FileFormatError(f"sd-ti-embedding chunk is not Base64 ({error})") from None
    return parse_payload_json(raw)


# ------------------------------------------------------------------------------- pixel blocks


def _block_width(payload_size: int, height: int) -> int:
    """Columns of each data block. Both alignment steps always add at least one element, even
    when already aligned (A1111's arithmetic, kept so block widths match A1111's files)."""
    size = payload_size + (height - payload_size % height)
    size = size + (height * _CHANNELS - size % (height * _CHANNELS))
    return size // (height * _CHANNELS)


def _nibble_block(nibbles: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cyclically repeat the nibbles to fill an h×W RGB block, row by row (numpy `resize`)."""
    return np.resize(nibbles, height * width * _CHANNELS).reshape(height, width, _CHANNELS).astype(np.uint8)


def _pattern_sequence(vector: torch.Tensor) -> np.ndarray:
    """Grey levels of the decorative dots: |v| / max|v| · 255 over the first 1024 values."""
    values = np.abs(vector.detach().to(torch.float64).cpu().numpy()[:1024])
    peak = values.max() if values.size else 0.0
    if peak <= 0 or not np.isfinite(peak):
        return np.full(max(values.size, 1), 255, dtype=np.uint8)
    return (values / peak * 255).astype(np.uint8)


def _dot_pattern(height: int, width: int, sequence: np.ndarray) -> np.ndarray:
    """A1111's `style_block` canvas: staggered 6-px dots every 8 px, shaded from `sequence`.

    Only the high nibble is kept and XORed over the data, so the low (data) nibble is untouched
    and the decoder never needs to reproduce this drawing.
    """
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    count = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            shade = int(sequence[count % len(sequence)])
            count += 1
            draw.ellipse((x + shift, y, x + 6 + shift, y + 6), fill=(shade, shade, shade))
    return np.asarray(canvas, dtype=np.uint8) & 0xF0


def insert_data_blocks(image: Image.Image, data: dict, pattern_vector: torch.Tensor) -> Image.Image:
    """Wrap `image` with the low- and high-nibble blocks of `data` (docs/formats.md, "Pixel blocks").

    Layout: low block | 1 black column | image | 1 black column | high block.
    """
    payload = np.frombuffer(zlib.compress(payload_json(data), level=9), dtype=np.uint8)
    height = image.size[1]
    width = _block_width(payload.shape[0], height)
    sequence = _pattern_sequence(pattern_vector)
    low = _nibble_block(payload & 0x0F, height, width) ^ _dot_pattern(height, width, sequence)
    high = _nibble_block(payload >> 4, height, width) ^ _dot_pattern(height, width, sequence[::-1])
    canvas = Image.new("RGB", (width + 1 + image.size[0] + 1 + width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(_scramble(low), mode="RGB"), (0, 0))
    canvas.paste(image.convert("RGB"), (width + 1, 0))
    canvas.paste(Image.fromarray(_scramble(high), mode="RGB"), (width + 1 + image.size[0] + 1, 0))
    return canvas


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """Keep the bounding rows/columns of pixels whose three channels are all non-zero."""
    lit = (pixels > 0).all(axis=2)
    rows, columns = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return pixels[:0, :0]
    return pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]


def extract_data_blocks(image: Image.Image) -> Any | None:
    """Decode the pixel copy of an embedding; None if the image has no data blocks."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    empty_columns = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if empty_columns.size < 2:
        return None
    low = _scramble(np.ascontiguousarray(pixels[:, : empty_columns[0], :]))
    high = _scramble(np.ascontiguousarray(pixels[:, empty_columns[-1] + 1 :, :]))
    if low.shape != high.shape:
        raise FileFormatError(f"image data blocks differ in size ({low.shape[1]} vs {high.shape[1]} columns)")
    stream = ((high << 4) | low).astype(np.uint8).tobytes()
    try:
        raw = zlib.decompressobj().decompress(stream, _MAX_PAYLOAD)
    except zlib.error as error:
        raise FileFormatError(f"image data blocks do not hold an embedding ({error})") from None
    return parse_payload_json(raw)


# ------------------------------------------------------------------------------- caption


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(size, 1))
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return max(right - left, 1)


def caption_overlay(
    image: Image.Image, title: str, footer_left: str, footer_mid: str, footer_right: str
) -> Image.Image:
    """A1111's caption on an embedding picture: a dark gradient at top and bottom, the title
    top-left, three footers along the bottom, fonts sized to fit
    (docs/formats.md, "Caption overlay")."""
    picture = image.convert("RGBA")
    width, height = picture.size
    gradient = Image.new("RGBA", (1, height))
    for y in range(height):
        mag = max(1 - math.cos(1.5 * y / height), 1 - math.cos(1.65 * (height - y) / height))
        gradient.putpixel((0, y), (0, 0, 0, min(255, int(mag * 255))))
    picture = Image.alpha_composite(picture, gradient.resize(picture.size))
    draw = ImageDraw.Draw(picture)
    padding, white = 10, (255, 255, 255, 230)
    title_size = min(int(32 * ((0.75 * width - 4 * padding) / _text_width(draw, title, _font(32)))), 72)
    title_font = _font(title_size)
    draw.text((padding, padding), title, anchor="lt", font=title_font, fill=white)
    footers = (footer_left, footer_mid, footer_right)
    footer_size = min(
        min(int(title_size * ((width / 3 - padding) / _text_width(draw, text, title_font))), 72) for text in footers
    )
    footer_font = _font(footer_size)
    draw.text((padding, height - padding), footer_left, anchor="ls", font=footer_font, fill=white)
    draw.text((width / 2, height - padding), footer_mid, anchor="ms", font=footer_font, fill=white)
    draw.text((width - padding, height - padding), footer_right, anchor="rs", font=footer_font, fill=white)
    return picture.convert("RGB")


def default_picture(embedding: Embedding, size: int = 256) -> Image.Image:
    """A smooth colour field seeded from the embedding's checksum, for when no preview exists."""
    rng = np.random.default_rng(int(embedding.checksum(), 16))
    corners = rng.integers(40, 216, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(corners, mode="RGB").resize((size, size), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------- files


def image_payload(embedding: Embedding) -> dict:
    """What the image carries: the A1111 `.pt` dict, or the vectors by encoder (SDXL `{clip_l, clip_g}`)."""
    if embedding.is_keyed:
        return {key: embedding.vectors[key].detach().to("cpu", torch.float32) for key in embedding.dim}
    return a1111_dict(embedding)


def save_png_embedding(
    embedding: Embedding,
    path: str | os.PathLike,
    image: Image.Image | None = None,
    caption: bool = True,
    steps_label: int | None = None,
) -> Path:
    """Write a PNG carrying `embedding` in both encodings, A1111 style.

    `image` is the picture (e.g. a training preview; default: a colour field); `caption` draws
    A1111's overlay, whose footer shows `<vectors>v <steps_label>s` (A1111's trainer passes
    its `steps_done`, the saved step + 1; default: the embedding's step). The written file is
    decoded again from its pixels before it replaces anything, so a PNG whose data blocks would
    not survive decoding is never left behind.
    """
    from tinv_lib.common.atomic import atomic_path

    path = Path(path)
    picture = image.convert("RGB") if image is not None else default_picture(embedding)
    if caption:
        steps = steps_label if steps_label is not None else (embedding.step or 0)
        picture = caption_overlay(
            picture,
            f"<{embedding.name}>",
            embedding.sd_checkpoint_name or "",
            f"[{embedding.sd_checkpoint}]" if embedding.sd_checkpoint else "",
            f"{embedding.vector_count}v {steps}s",
        )
    data = image_payload(embedding)
    pattern = next(iter(data.values()))[0] if embedding.is_keyed else data["string_to_param"]["*"][0]
    wrapped = insert_data_blocks(picture, data, pattern)
    if extract_data_blocks(wrapped) is None:
        raise TinvError(f"{path}: the picture hides the embedding's data blocks; use another picture")
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, text_chunk_value(data))
    if embedding.is_keyed:
        meta = {key: getattr(embedding, key) for key in METADATA_KEYS if getattr(embedding, key) is not None}
        info.add_text(META_CHUNK_KEY, json.dumps(meta))
    with atomic_path(path) as tmp:
        wrapped.save(tmp, format="PNG", pnginfo=info)
    return path


def _embedding_from_image_data(data: Any, stem: str, where: str, meta: str | None) -> Embedding:
    if not isinstance(data, dict):
        raise FileFormatError(f"{where}: embedding data is not a dict")
    name = data.get("name", stem)
    embedding = embedding_from_data(data, name if isinstance(name, str) else stem, where)
    if meta and embedding.is_keyed:
        try:
            values = json.loads(meta)
        except ValueError:
            values = {}
        for key, value in metadata_from_dict(values if isinstance(values, dict) else {}).items():
            setattr(embedding, key, value)
    return embedding


def load_image_embedding(path: str | os.PathLike) -> Embedding:
    """Read an image embedding: the text chunk if present and sound, else the pixel blocks.

    Raises `NotAnEmbeddingError` for `*.preview.*` thumbnails and plain pictures, and
    `FileFormatError` for damaged data.
    """
    path = Path(path)
    if path.stem.lower().endswith(".preview"):
        raise NotAnEmbeddingError(f"{path}: a preview thumbnail, not an embedding")
    try:
        with Image.open(path) as opened:
            text = dict(getattr(opened, "text", None) or {})
            kind = opened.format.lower() if opened.format else path.suffix[1:].lower()
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise FileFormatError(f"{path}: not a readable image ({str(error).splitlines()[0]})") from None
    text_error: FileFormatError | None = None
    if TEXT_CHUNK_KEY in text:
        try:
            embedding = _embedding_from_image_data(
                data_from_text_chunk(text[TEXT_CHUNK_KEY]), path.stem, str(path), text.get(META_CHUNK_KEY)
            )
            embedding.format = f"{kind}-text"
            return embedding
        except FileFormatError as error:
            text_error = error
    try:
        data = extract_data_blocks(image)
    except FileFormatError as error:
        raise text_error or FileFormatError(f"{path}: {error}") from None
    if data is None:
        if text_error:
            raise text_error
        raise NotAnEmbeddingError(f"{path}: no embedding in this image (no text chunk, no data blocks)")
    embedding = _embedding_from_image_data(data, path.stem, str(path), text.get(META_CHUNK_KEY))
    embedding.format = f"{kind}-pixels"
    return embedding
