"""Drawing a scene as a 64 px RGB image.

Everything is drawn at 4x and box-filtered down, so edges are anti-aliased the same way in every
image (a model trained on aliased pixels learns the aliasing). Drawing is a pure function of the
scene: the same scene gives the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from toy_world.world import (
    BACKGROUND_COLOURS,
    COLOURS,
    IMAGE_SIZE,
    OUTLINE_COLOUR,
    Scene,
    validate,
)

SUPERSAMPLE = 4
PATTERN_PERIOD = 8.0  # pixels at 64 px
OUTLINE_WIDTH = 2  # pixels at 64 px
SECOND_TONE = 0.55  # textures mix the background colour with this darker copy of it


def _regular_polygon(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon around the origin (y down, as in images)."""
    return [
        (radius * math.cos(math.radians(start_deg + 360.0 * i / n)),
         radius * math.sin(math.radians(start_deg + 360.0 * i / n)))
        for i in range(n)
    ]


def _star(radius: float) -> list[tuple[float, float]]:
    """A five-pointed star, point up, inner radius 0.48 of the outer (arms thick enough to survive
    the 4x downsampling of the VAE)."""
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.48
        angle = math.radians(-90.0 + 36.0 * i)
        points.append((r * math.cos(angle), r * math.sin(angle)))
    return points


def _cross(radius: float) -> list[tuple[float, float]]:
    """A plus sign: arms of half-width 0.3 r reaching r from the centre."""
    a, w = radius, radius * 0.3
    return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
            (-a, -w), (-w, -w)]


POLYGONS = {
    "square": lambda r: _regular_polygon(4, r * 1.05, 45.0),
    "triangle": lambda r: _regular_polygon(3, r * 1.1, -90.0),
    "star": _star,
    "cross": _cross,
}

RING_INNER = 0.55  # inner radius of a ring, as a fraction of its outer radius


def _place(points: list[tuple[float, float]], scene: Scene, scale: float) -> list[tuple[float, float]]:
    """Rotate by the scene's rotation, move to its centre, scale to the drawing resolution."""
    c, s = math.cos(math.radians(scene.rotation)), math.sin(math.radians(scene.rotation))
    return [((scene.cx + x * c - y * s) * scale, (scene.cy + x * s + y * c) * scale) for x, y in points]


def shape_mask(scene: Scene, scale: int = SUPERSAMPLE) -> Image.Image:
    """The shape's silhouette ("L", 255 inside) at `scale` times the image size."""
    size = IMAGE_SIZE * scale
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = scene.cx * scale, scene.cy * scale, scene.radius * scale
    if scene.shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if scene.shape == "ring":
            ri = r * RING_INNER
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        draw.polygon(_place(POLYGONS[scene.shape](scene.radius), scene, scale), fill=255)
    return mask


def _erode(mask: Image.Image, pixels: int) -> Image.Image:
    """Shrink the silhouette by `pixels` (3x3 minimum filter, repeated), on its bounding box only."""
    box = mask.getbbox()
    if box is None:
        return mask
    pad = pixels + 1
    box = (max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, mask.width), min(box[3] + pad, mask.height))
    region = mask.crop(box)
    for _ in range(pixels):
        region = region.filter(ImageFilter.MinFilter(3))
    out = Image.new("L", mask.size, 0)
    out.paste(region, box[:2])
    return out


def background_array(scene: Scene, scale: int = SUPERSAMPLE) -> np.ndarray:
    """The background as float RGB (H, W, 3) at `scale` times the image size.

    Textures are two-tone: the named colour and a darker copy of it. Stripes run diagonally,
    checks and dots sit on an 8 px grid; the scene's phase shifts the pattern.
    """
    size = IMAGE_SIZE * scale
    base = np.array(BACKGROUND_COLOURS[scene.background_colour], dtype=np.float32)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.background == "plain":
        return image
    coords = (np.arange(size, dtype=np.float32) + 0.5) / scale + scene.phase
    x, y = coords[None, :], coords[:, None]
    if scene.background == "striped":
        second = ((x + y) / math.sqrt(2.0)) % PATTERN_PERIOD < PATTERN_PERIOD / 2
    elif scene.background == "checkered":
        second = (np.floor(x / PATTERN_PERIOD) + np.floor(y / PATTERN_PERIOD)) % 2 == 1
    else:  # dotted
        dx = (x % PATTERN_PERIOD) - PATTERN_PERIOD / 2
        dy = (y % PATTERN_PERIOD) - PATTERN_PERIOD / 2
        second = dx**2 + dy**2 < 1.8**2
    image[second] = base * SECOND_TONE
    return image


def draw_scene(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    validate(scene)
    image = background_array(scene)
    mask = shape_mask(scene)
    layers = [(mask, COLOURS[scene.colour])]
    if scene.outline:
        inner = _erode(mask, OUTLINE_WIDTH * SUPERSAMPLE)
        layers = [(mask, OUTLINE_COLOUR), (inner, COLOURS[scene.colour])]
    for layer, colour in layers:
        alpha = np.asarray(layer, dtype=np.float32)[..., None] / 255.0
        image = image * (1.0 - alpha) + np.array(colour, dtype=np.float32) * alpha
    big = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), "RGB")
    return big.reduce(SUPERSAMPLE)


def inside_point(scene: Scene) -> tuple[int, int]:
    """A pixel (x, y) that lies well inside the shape's fill, away from edges and outline."""
    if scene.shape == "ring":  # halfway through the ring's body, to the right of its centre
        return int(scene.cx + scene.radius * (1.0 + RING_INNER) / 2.0), int(scene.cy)
    return int(scene.cx), int(scene.cy)
