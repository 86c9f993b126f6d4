"""Focal-point crop: crop a non-square image around its subject, A1111's "auto focal point crop".

The focal point is a weighted average of up to three centroids
(docs/preprocess.md, "Focal point crop"), each weight
normalised over the detectors that found something:

* **edges** — strong corners on the greyscale image, whose bottom 10 % is first painted grey so
  that watermarks do not attract the crop. A1111 uses OpenCV's `goodFeaturesToTrack`; we compute
  the same Shi-Tomasi score (the smaller eigenvalue of the 3x3-summed gradient structure tensor,
  Sobel gradients) with numpy and select corners the same way: at most 100, quality 0.04 of the
  best score, local maxima only, at least 6 % of the short side apart, strongest first.
* **entropy** — a crop-sized window slides along the long axis in 4-px steps; the window with the
  highest entropy wins. We use the Shannon entropy of the 256-bin greyscale histogram; A1111
  sums `-log2 p` over a 1-bit image, which rewards windows holding a few stray pixels rather than
  detail. All window histograms come from one cumulative per-line histogram, so the scan costs
  one pass over the image.
* **faces** — only with a local YuNet ONNX model (`--face_model`) and OpenCV installed: each face
  gives the point `(x + w/2, y + 0.33 h)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tinv_lib.common.errors import TinvError

Point = tuple[float, float]
FaceDetector = Callable[[Image.Image], list[Point]]

MAX_CORNERS = 100
CORNER_QUALITY = 0.04
CORNER_MIN_DISTANCE = 0.06  # of the short side
WATERMARK_BAND = 0.1  # bottom fraction painted grey before corner detection
WATERMARK_GREY = 0x99
ENTROPY_STEP = 4


@dataclass(frozen=True)
class FocalWeights:
    """Relative pull of each detector (A1111 UI defaults). A weight of 0 disables a detector."""

    edges: float = 0.5
    entropy: float = 0.15
    faces: float = 0.9


# ---------------------------------------------------------------------------------------------
# Small numpy filters (no SciPy / OpenCV needed)
# ---------------------------------------------------------------------------------------------


def _sum3(values: np.ndarray) -> np.ndarray:
    """3x3 box sum with edge replication (the structure-tensor window of `goodFeaturesToTrack`)."""
    padded = np.pad(values, 1, mode="edge")
    h, w = values.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def _max3(values: np.ndarray) -> np.ndarray:
    """3x3 maximum filter, used to keep local maxima only (OpenCV dilates for the same purpose)."""
    padded = np.pad(values, 1, mode="edge")
    h, w = values.shape
    out = padded[0:h, 0:w].copy()
    for dy in range(3):
        for dx in range(3):
            np.maximum(out, padded[dy : dy + h, dx : dx + w], out=out)
    return out


def _sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel x and y derivatives (aperture 3) with edge replication."""
    p = np.pad(grey, 1, mode="edge")
    h, w = grey.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------


def corner_score(grey: np.ndarray) -> np.ndarray:
    """Shi-Tomasi corner strength: the smaller eigenvalue of the local gradient structure tensor.

    Large only where the image changes strongly in two directions (corners, texture), not along
    a straight edge or on flat areas.
    """
    gx, gy = _sobel(grey.astype(np.float32))
    a, b, c = _sum3(gx * gx), _sum3(gx * gy), _sum3(gy * gy)
    return (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b**2)


def corner_points(
    grey: np.ndarray,
    max_corners: int = MAX_CORNERS,
    quality: float = CORNER_QUALITY,
    min_distance: float | None = None,
) -> list[Point]:
    """Strongest well-separated corners as (x, y), strongest first (`goodFeaturesToTrack` rules)."""
    score = corner_score(grey)
    best = float(score.max(initial=0.0))
    if best <= 0:
        return []
    if min_distance is None:
        min_distance = max(1.0, min(grey.shape) * CORNER_MIN_DISTANCE)
    keep = (score >= quality * best) & (score >= _max3(score))
    ys, xs = np.nonzero(keep)
    order = np.argsort(-score[ys, xs], kind="stable")
    chosen: list[Point] = []
    limit = min_distance * min_distance
    for y, x in zip(ys[order].tolist(), xs[order].tolist()):
        if all((x - cx) ** 2 + (y - cy) ** 2 >= limit for cx, cy in chosen):
            chosen.append((float(x), float(y)))
            if len(chosen) >= max_corners:
                break
    return chosen


def _window_entropies(line_hist: np.ndarray, window: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Shannon entropy (bits) of every `window`-line slice, from per-line 256-bin histograms."""
    cumulative = np.concatenate([np.zeros((1, 256)), np.cumsum(line_hist, axis=0)])
    starts = np.arange(0, line_hist.shape[0] - window + 1, step)
    counts = cumulative[starts + window] - cumulative[starts]
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return starts, terms.sum(axis=1)


def entropy_point(grey: np.ndarray, width: int, height: int) -> Point | None:
    """Centre of the crop-sized window with the most greyscale entropy along the long axis.

    None when the image already has the crop's size on both axes (nothing to slide).
    """
    rows, cols = grey.shape
    values = grey.astype(np.int64)
    if rows > height:
        line_hist = np.stack([np.bincount(row, minlength=256) for row in values[:, :width]])
        starts, entropy = _window_entropies(line_hist, height, ENTROPY_STEP)
        top = int(starts[int(np.argmax(entropy))])
        return (width / 2, top + height / 2)
    if cols > width:
        line_hist = np.stack([np.bincount(col, minlength=256) for col in values[:height, :].T])
        starts, entropy = _window_entropies(line_hist, width, ENTROPY_STEP)
        left = int(starts[int(np.argmax(entropy))])
        return (left + width / 2, height / 2)
    return None


def load_face_detector(model_path: str | Path) -> FaceDetector:
    """A YuNet face detector from a local ONNX file (score 0.9, NMS 0.3, top-k 5000, as A1111).

    Face detection is optional: it needs OpenCV, which tinv does not depend on. Raises
    `TinvError` with what to install when OpenCV is missing, or when the file does not exist.
    """
    path = Path(model_path)
    if not path.is_file():
        raise TinvError(f"--face_model {path}: no such file (give a local YuNet .onnx model)")
    try:
        import cv2  # optional: tinv does not depend on OpenCV
    except ImportError:
        raise TinvError(
            "--face_model needs OpenCV, which is not installed: pip install opencv-python-headless "
            "(or drop --face_model; edges and entropy still guide the focal crop)"
        ) from None

    def detect(image: Image.Image) -> list[Point]:
        detector = cv2.FaceDetectorYN.create(str(path), "", image.size, 0.9, 0.3, 5000)
        _, faces = detector.detect(np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]))
        if faces is None:
            return []
        return [(float(x + w / 2), float(y + h * 0.33)) for x, y, w, h in faces[:, :4]]

    return detect


# ---------------------------------------------------------------------------------------------
# Focal point and crop
# ---------------------------------------------------------------------------------------------


def _centroid(points: list[Point]) -> Point:
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


def focal_point(
    image: Image.Image,
    width: int,
    height: int,
    weights: FocalWeights = FocalWeights(),
    face_detector: FaceDetector | None = None,
) -> Point:
    """Weighted average of the detectors' centroids; the image centre if none found anything."""
    grey = np.asarray(image.convert("L"))
    found: list[tuple[Point, float]] = []
    if weights.edges > 0:
        masked = grey.copy()
        masked[int(grey.shape[0] * (1 - WATERMARK_BAND)) :, :] = WATERMARK_GREY
        corners = corner_points(masked)
        if corners:
            found.append((_centroid(corners), weights.edges))
    if weights.entropy > 0:
        point = entropy_point(grey, width, height)
        if point is not None:
            found.append((point, weights.entropy))
    if weights.faces > 0 and face_detector is not None:
        faces = face_detector(image)
        if faces:
            found.append((_centroid(faces), weights.faces))
    total = sum(weight for _, weight in found)
    if not found or total <= 0:
        return (image.width / 2, image.height / 2)
    x = sum(point[0] * weight for point, weight in found) / total
    y = sum(point[1] * weight for point, weight in found) / total
    return (x, y)


def focal_crop(
    image: Image.Image,
    width: int,
    height: int,
    weights: FocalWeights = FocalWeights(),
    face_detector: FaceDetector | None = None,
) -> Image.Image:
    """Scale `image` to cover `width x height`, then cut the crop centred on the focal point.

    The crop is clamped to the image. A1111 scales by one side chosen from the orientations,
    which can leave the crop larger than the image for some targets; we always scale to cover.
    """
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    scaled = image.resize(size, resample=Image.Resampling.BICUBIC)
    fx, fy = focal_point(scaled, width, height, weights, face_detector)
    left = min(max(int(fx - width / 2), 0), scaled.width - width)
    top = min(max(int(fy - height / 2), 0), scaled.height - height)
    return scaled.crop((left, top, left + width, top + height))
