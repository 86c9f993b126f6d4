"""Deterministic toy-world data: scenes, image arrays, training captions and example folders.

Every scene is a pure function of `(seed, index)`, so a dataset can be rebuilt bit for bit from
its seed, split across processes, or extended without changing its first images. Example folders
(the README's concept images, the hypernetwork's style images) are written in the layout the
training scripts read: `NNNN.png` with a `.txt` caption sidecar, a `.json` ground-truth sidecar and,
on request, the shape's silhouette as a `NNNN-masklabel.png` loss mask.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from tinv_lib.common.atomic import atomic_path, atomic_write_bytes
from toy_world.draw import SUPERSAMPLE, draw_scene, shape_mask
from toy_world.world import CAPTION_PREFIXES, Scene, caption, sample_scene


def scene_rng(seed: int, index: int) -> random.Random:
    """The random source of scene `index` of dataset `seed` (string seeds hash the same everywhere)."""
    return random.Random(f"toy-world/{seed}/{index}")


def make_scenes(seed: int, count: int, outline_probability: float = 0.0, start: int = 0, **fixed) -> list[Scene]:
    """Scenes `start .. start+count-1` of dataset `seed`; `fixed` pins attributes (see `sample_scene`)."""
    return [
        sample_scene(scene_rng(seed, start + i), outline_probability=outline_probability, **fixed)
        for i in range(count)
    ]


def _draw_many(scenes: Sequence[Scene]) -> np.ndarray:
    return np.stack([np.asarray(draw_scene(scene)) for scene in scenes])


def draw_images(scenes: Sequence[Scene], workers: int = 1) -> np.ndarray:
    """The scenes drawn as a uint8 array (N, 64, 64, 3); `workers` > 1 draws in processes."""
    if workers <= 1 or len(scenes) < 256:
        return _draw_many(scenes)
    chunk = (len(scenes) + workers * 4 - 1) // (workers * 4)
    parts = [scenes[i : i + chunk] for i in range(0, len(scenes), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_draw_many, parts)))


def training_caption(
    scene: Scene, rng: random.Random, drop_all: float = 0.1, drop_colour: float = 0.1, drop_background: float = 0.2
) -> str:
    """A caption for one training step: a random template prefix, sometimes shortened or empty.

    Empty captions (`drop_all`) train the unconditional model that classifier-free guidance
    needs; shortened ones teach that unnamed attributes are free.
    """
    if rng.random() < drop_all:
        return ""
    return caption(
        scene,
        prefix=rng.choice(CAPTION_PREFIXES),
        with_colour=rng.random() >= drop_colour,
        with_background=rng.random() >= drop_background,
    )


def write_example_folder(
    folder: str | Path, scenes: Sequence[Scene], captions: Sequence[str] | None = None, masks: bool = False
) -> Path:
    """Write `NNNN.png` + `NNNN.json` (ground truth) per scene, `NNNN.txt` captions if given, and
    `NNNN-masklabel.png` silhouettes if `masks`.

    Without captions the trainers see no file words, which is what a concept that has no name
    in the model's vocabulary should look like. Masks let masked training be measured on data
    whose true object outline is known exactly.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        stem = folder / f"{index:04d}"
        with atomic_path(stem.with_suffix(".png")) as tmp:
            draw_scene(scene).save(tmp, format="PNG")
        if masks:
            with atomic_path(folder / f"{index:04d}-masklabel.png") as tmp:
                scene_mask(scene).save(tmp, format="PNG")
        if captions is not None:
            atomic_write_bytes(stem.with_suffix(".txt"), (captions[index] + "\n").encode("utf-8"))
        atomic_write_bytes(stem.with_suffix(".json"), json.dumps(scene.to_dict(), indent=1).encode("utf-8"))
    return folder


def scene_mask(scene: Scene) -> Image.Image:
    """The shape's silhouette at image size ("L", 255 inside), box-filtered from the supersampled
    mask exactly as `draw_scene` filters the picture, so mask edges match the drawn edges."""
    return shape_mask(scene).reduce(SUPERSAMPLE)


def read_example_scenes(folder: str | Path) -> list[Scene]:
    """The ground truth of an example folder written by `write_example_folder`."""
    return [Scene.from_dict(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(Path(folder).glob("*.json"))]
