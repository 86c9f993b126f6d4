"""Pure preprocessing rules: A1111's split/resize/auto-size numbers, colour modes, focal points,
caption text rules. In memory, tiny images, no models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinv_lib.preprocessing.captioning import filename_caption, merge_caption
from tinv_lib.preprocessing.focal_crop import FocalWeights, corner_points, entropy_point, focal_crop
from tinv_lib.preprocessing.image_ops import (
    AutosizeSettings,
    aspect_error,
    centre_crop_resize,
    choose_autosize,
    crop_and_resize,
    fill_size,
    plan_split,
    split_offsets,
    to_rgb,
)

# ------------------------------------------------------------------------------------------ split


def test_split_512x1536_gives_a1111_tiles() -> None:
    # ratio (512*512)/(1536*512) = 1/3 <= 0.5; N = ceil((1536 - 102.4) / 409.6) = ceil(3.5) = 4
    plan = plan_split(512, 1536, 512, 512, threshold=0.5, overlap=0.2)
    assert plan is not None
    assert plan.resized == (512, 1536) and not plan.horizontal
    assert plan.offsets == [0, 341, 682, 1024]  # int(i * 1024 / 3)


def test_split_wide_images_cut_along_x() -> None:
    plan = plan_split(1536, 512, 512, 512, 0.5, 0.2)
    assert plan is not None and plan.horizontal and plan.resized == (1536, 512)
    assert plan.offsets == [0, 341, 682, 1024]
    # a 3000x1000 image is first scaled to the target height: 1536 long, same tiles
    assert plan_split(3000, 1000, 512, 512, 0.5, 0.2).offsets == [0, 341, 682, 1024]


def test_split_threshold_and_clamping() -> None:
    assert plan_split(512, 900, 512, 512, 0.5, 0.2) is None  # ratio 0.569 > 0.5
    plan = plan_split(512, 900, 512, 512, 0.6, 0.2)  # N = ceil(797.6 / 409.6) = 2
    assert plan is not None and plan.offsets == [0, 388]
    assert plan_split(512, 512, 512, 512, 1.0, 0.2) is None  # ratio 1 is never split
    assert plan_split(512, 600, 512, 512, 5.0, 0.2) is not None  # threshold clamped to 1
    assert split_offsets(600, 512, 0.0) == [0, 88]
    assert split_offsets(520, 512, 0.2) == [0, 8]
    assert split_offsets(512, 512, 0.2) == [0]  # one tile: no division by zero


# ------------------------------------------------------------------------------ crop and resize


def test_fill_size_uses_a1111_integer_math() -> None:
    assert fill_size(512, 512, 1000, 600) == (853, 512)
    assert fill_size(512, 512, 600, 1000) == (512, 853)
    assert fill_size(768, 512, 1000, 1000) == (768, 768)


def test_crop_and_resize_keeps_the_centre() -> None:
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    out = crop_and_resize(image, 50, 50)
    assert out.size == (50, 50)
    pixels = np.asarray(out).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - [0, 255, 0]).max(axis=1) <= 2).mean() > 0.95


# ------------------------------------------------------------------------------- auto-sized crop


def test_autosize_objectives() -> None:
    settings = AutosizeSettings()
    assert aspect_error(1200, 800, 768, 512) == 0.0
    assert choose_autosize(1200, 800, settings) == (768, 512)
    # 1100x1000: 640x640 is the largest area within 10 % error; 640x576 has the least error
    assert choose_autosize(1100, 1000, settings) == (640, 640)
    assert choose_autosize(1100, 1000, AutosizeSettings(objective="error")) == (640, 576)
    assert choose_autosize(1000, 999, AutosizeSettings(threshold=0.0)) is None
    assert choose_autosize(5000, 100, settings) is None


def test_centre_crop_resize_size_and_content() -> None:
    image = Image.new("RGB", (400, 100), (0, 0, 255))
    image.paste((255, 255, 0), (150, 0, 250, 100))
    out = centre_crop_resize(image, 64, 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[32, 32].tolist() == [255, 255, 0]


# ---------------------------------------------------------------------------------- colour modes


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(values))
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert np.asarray(to_rgb(ints))[0, :, 0].tolist() == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_flattened_onto_white() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    rgb = np.asarray(to_rgb(palette))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[2, 2].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]


def test_cmyk_and_grey_convert() -> None:
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)


# ------------------------------------------------------------------------------------ focal crop


def plain_with_detail(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A flat grey image with a patch of random noise (the "high-detail object") in `box`."""
    pixels = np.full((height, width, 3), 120, dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = np.random.default_rng(0).integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def detail_pixels(image: Image.Image) -> int:
    return int((np.asarray(image) != 120).any(axis=2).sum())


@pytest.mark.parametrize(
    ("size", "box"),
    [((96, 288), (30, 210, 66, 250)), ((288, 96), (10, 30, 50, 70)), ((96, 288), (20, 8, 60, 40))],
)
def test_focal_crop_keeps_an_off_centre_object(size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    image = plain_with_detail(*size, box)
    object_pixels = detail_pixels(image)
    assert detail_pixels(crop_and_resize(image, 96, 96)) < object_pixels / 2  # a centre crop loses it
    for weights in (FocalWeights(), FocalWeights(edges=0.5, entropy=0, faces=0), FocalWeights(0, 0.15, 0)):
        crop = focal_crop(image, 96, 96, weights)
        assert crop.size == (96, 96)
        assert detail_pixels(crop) == object_pixels, weights


def test_corner_points_find_the_corners_of_a_square() -> None:
    grey = np.zeros((64, 64), dtype=np.uint8)
    grey[16:48, 16:48] = 255
    points = corner_points(grey)
    corners = [(16, 16), (47, 16), (16, 47), (47, 47)]
    assert 4 <= len(points) <= 100
    nearest = [min(((x - cx) ** 2 + (y - cy) ** 2) ** 0.5 for cx, cy in corners) for x, y in points]
    assert max(nearest) <= 3
    assert all(any(((x - cx) ** 2 + (y - cy) ** 2) ** 0.5 <= 3 for x, y in points) for cx, cy in corners)
    assert corner_points(np.full((32, 32), 9, dtype=np.uint8)) == []  # flat: nothing to find


def test_entropy_point_slides_along_the_long_axis() -> None:
    grey = np.asarray(plain_with_detail(64, 256, (0, 180, 64, 230)).convert("L"))
    x, y = entropy_point(grey, 64, 64)
    assert x == 32 and 180 - 64 < y - 32 and y + 32 > 230 - 64
    assert entropy_point(grey[:64], 64, 64) is None


# ------------------------------------------------------------------------------- caption rules


def test_merge_caption_actions() -> None:
    assert merge_caption("new words", "old", "ignore") == "new words"
    assert merge_caption("new words", "old", "copy") == "old"
    assert merge_caption("new words", "old", "prepend") == "old new words"
    assert merge_caption("new words", "old", "append") == "new words old"
    assert merge_caption("", "old\n", "prepend") == "old"
    assert merge_caption("new", None, "copy") == "new"
    assert merge_caption("  ", None, "ignore") == ""


def test_filename_caption_characters_and_length() -> None:
    text = 'a cat: "sitting" on/under a mat?'
    assert filename_caption(text, "/data/out", "00000-0", windows=True) == "a cat sitting onunder a mat"
    assert filename_caption(text, "/data/out", "00000-0", windows=False) == 'a cat: "sitting" onunder a mat?'
    assert filename_caption("two\nlines\tand  spaces", "/d", "00001-2", windows=False) == "two lines and spaces"
    # Windows: the whole path must fit in 259 characters; cut at a word boundary
    dest = "C:/" + "d" * 200
    long_caption = " ".join(["word"] * 40)
    fitted = filename_caption(long_caption, dest, "00000-0", windows=True)
    assert len(f"{dest}/00000-0-{fitted}.png") <= 259 and fitted.endswith("word") and fitted.startswith("word word")
    assert len(f"{dest}/00000-0-{fitted} word.png") > 259
    # any OS: the file name stays well under the 255-byte limit, even with multi-byte characters
    wide = filename_caption(" ".join(["ça"] * 200), "/d", "00000-0", windows=False)
    assert 150 < len(f"00000-0-{wide}.png".encode()) <= 200
    assert filename_caption("x" * 500, "/d", "00000-0", windows=False) == "x" * (200 - len("00000-0-.png"))
