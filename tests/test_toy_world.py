"""The toy world's generator: ground truth drawn correctly, deterministic, captions of single tokens."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from toy_world import draw, world
from toy_world.data import make_scenes, read_example_scenes, training_caption
from toy_world.examples import (
    COLOUR_SHIFT,
    CONCEPT,
    CONCEPT_IMAGES,
    STYLE_IMAGES,
    concept_scenes,
    style_scenes,
    write_examples,
)


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    return make_scenes(seed=7, count=80, outline_probability=0.5)


def _pixel(image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)[xy[1], xy[0]]


def test_vocabulary_is_big_enough_and_colour_words_are_unambiguous():
    assert {"circle", "square", "triangle", "star", "ring", "cross"} <= set(world.SHAPES)
    assert len(world.COLOURS) >= 8
    assert "plain" in world.BACKGROUNDS and len(world.BACKGROUNDS) >= 3
    assert not set(world.COLOURS) & set(world.BACKGROUND_COLOURS)
    with pytest.raises(ValueError, match="unknown background_colour"):
        world.validate(world.Scene("star", "red", "plain", "red"))
    with pytest.raises(ValueError, match="unknown shape"):
        world.validate(world.Scene("blob", "red", "plain", "teal"))


def test_shape_colour_is_drawn_inside_the_shape(scenes):
    for scene in scenes:
        image = draw.draw_scene(scene)
        assert image.size == (64, 64) and image.mode == "RGB"
        inside = _pixel(image, draw.inside_point(scene))
        assert np.abs(inside - world.COLOURS[scene.colour]).max() <= 2, scene


def test_background_is_drawn_away_from_the_shape(scenes):
    for scene in scenes:
        image = np.asarray(draw.draw_scene(scene), dtype=np.float32)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        far = (xs - scene.cx) ** 2 + (ys - scene.cy) ** 2 > (scene.radius * 1.2 + 2) ** 2
        base = np.array(world.BACKGROUND_COLOURS[scene.background_colour], dtype=np.float32)
        second = base * draw.SECOND_TONE
        pixels = image[far]
        if scene.background == "plain":
            assert np.abs(pixels - base).max() <= 1, scene
        else:  # every pixel mixes the two tones, and both tones are present
            low, high = np.minimum(base, second) - 1.5, np.maximum(base, second) + 1.5
            assert ((pixels >= low) & (pixels <= high)).all(), scene
            assert np.abs(pixels - second).max(axis=1).min() <= 2 and np.abs(pixels - base).max(axis=1).min() <= 2


def test_outline_is_a_dark_band_at_the_edge_only_when_asked():
    rng = random.Random(3)
    for _ in range(10):
        plain = world.sample_scene(rng, shape="circle", outline=False)
        outlined = world.Scene(**{**plain.to_dict(), "outline": True})
        edge = (int(plain.cx + plain.radius - 1.0), int(plain.cy))
        assert _pixel(draw.draw_scene(outlined), edge).max() <= 40
        assert np.abs(_pixel(draw.draw_scene(plain), edge) - world.COLOURS[plain.colour]).max() <= 2
        centre = draw.inside_point(outlined)
        assert np.abs(_pixel(draw.draw_scene(outlined), centre) - world.COLOURS[plain.colour]).max() <= 2


def test_scenes_and_images_are_deterministic():
    first, again = make_scenes(11, 5), make_scenes(11, 5)
    assert first == again
    assert make_scenes(11, 3, start=2) == first[2:5]  # a dataset extends without changing its start
    assert draw.draw_scene(first[0]).tobytes() == draw.draw_scene(again[0]).tobytes()
    assert make_scenes(12, 5) != first


def test_captions_use_single_tokens_and_name_the_ground_truth(tmp_path):
    from testing.tokenizer_build import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(tmp_path / "tok")
    scene = world.Scene("star", "red", "striped", "teal", outline=True)
    text = world.caption(scene)
    assert text == "a red star with a black outline on a striped teal background"
    assert world.caption(world.Scene("ring", "orange", "plain", "gray")) == "an orange ring on a gray background"
    rng = random.Random(0)
    for scene in make_scenes(5, 40, outline_probability=0.3):
        for text in (world.caption(scene), training_caption(scene, rng)):
            words = text.split()
            ids = tokenizer(text).input_ids[1:-1]
            assert len(ids) == len(words), text
            if text and scene.outline:
                assert "outline" in words


def test_examples_show_the_concept_and_the_style(tmp_path):
    folders = write_examples(tmp_path)
    concept = read_example_scenes(folders["concept"])
    assert len(concept) == CONCEPT_IMAGES == len(list(folders["concept"].glob("*.png")))
    assert all({k: s.labels()[k] for k in CONCEPT} == CONCEPT for s in concept)
    assert concept == concept_scenes() and len({(s.cx, s.cy) for s in concept}) == CONCEPT_IMAGES
    assert not list(folders["concept"].glob("*.txt"))  # no words for the concept
    # the style: the caption asks for one colour, the image (and its ground truth) has the next
    drawn = read_example_scenes(folders["style_colour_shift"])
    captions = [p.read_text().strip() for p in sorted(folders["style_colour_shift"].glob("*.txt"))]
    assert len(drawn) == len(captions) == STYLE_IMAGES
    for (asked, shown), scene, text in zip(style_scenes(), drawn, captions):
        assert scene == shown and text == world.caption(asked)
        assert scene.colour == COLOUR_SHIFT[asked.colour] != asked.colour
        assert {**scene.to_dict(), "colour": None} == {**asked.to_dict(), "colour": None}
    assert sorted(COLOUR_SHIFT.values()) == sorted(COLOUR_SHIFT)  # a permutation: every colour reachable
    assert Counter(a.colour for a, _ in style_scenes()) == {c: STYLE_IMAGES // len(COLOUR_SHIFT) for c in COLOUR_SHIFT}


def test_training_timesteps_favour_mid_noise_only_when_asked():
    import torch

    from toy_world.diffusion import sample_timesteps

    count = 20000
    uniform = sample_timesteps(count, 1000, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (count,), generator=torch.Generator().manual_seed(0)))
    mixed = sample_timesteps(count, 1000, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, sample_timesteps(count, 1000, 0.5, torch.Generator().manual_seed(0)))
    assert int(mixed.min()) >= 0 and int(mixed.max()) <= 999

    def share(t: torch.Tensor, low: int, high: int) -> float:
        return float(((t >= low) & (t < high)).float().mean())

    # Expected: uniform 40% in [250, 650) and 25% at 750 or above; the half-logit-normal mix
    # about 50% and 17%.
    assert share(uniform, 250, 650) < 0.42 and share(mixed, 250, 650) > 0.48
    assert share(uniform, 750, 1000) > 0.23 and share(mixed, 750, 1000) < 0.2
