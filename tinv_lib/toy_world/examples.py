"""The bundled example datasets: a concept for textual inversion and a style for hypernetworks.

* `examples/concept/`: 8 images of one combination (`CONCEPT`) that the model can draw but has
  no single word for. They carry no captions: the embedding has to learn the whole combination.
* `examples/style_colour_shift/`: ordinary scenes whose shape is drawn in the *next* colour of
  `COLOUR_SHIFT` (a red star is drawn orange), captioned with the colour asked for. A
  hypernetwork trained on them learns to shift the colour of ordinary prompts, which the base
  model never does: it draws the colour it is told.

Both are deterministic from fixed seeds, and every image has a `.json` ground-truth sidecar (of
what is drawn, so the style images' sidecars hold the shifted colour).
"""

from __future__ import annotations

from pathlib import Path

from tinv_lib.toy_world.data import make_scenes, scene_rng, write_example_folder
from tinv_lib.toy_world.world import COLOURS, Scene, caption, sample_scene

CONCEPT = {"shape": "triangle", "colour": "pink", "background": "checkered", "background_colour": "teal"}
CONCEPT_IMAGES = 8

# The style: every shape colour becomes the next one round the palette (red -> orange -> yellow
# -> green -> blue -> purple -> pink -> white -> red); backgrounds keep theirs. A colour shift,
# not the black outline the world also knows: a hypernetwork reaches the image only through the
# prompt's keys and values, and rerouting one colour word to another is a change of those, while
# every outline setting screened kept the prompt's colour in at most 63% of images
# (docs/toy_world.md).
_PALETTE = tuple(COLOURS)
COLOUR_SHIFT = {colour: _PALETTE[(index + 1) % len(_PALETTE)] for index, colour in enumerate(_PALETTE)}
# 8 images per colour, so every step of the shift is shown as often as every other.
STYLE_IMAGES = 8 * len(_PALETTE)

_CONCEPT_SEED = 808
_STYLE_SEED = 909


def style_target(prompt_colour: str) -> dict[str, str]:
    """What the judge must see in an image of a prompt asking for `prompt_colour`, with the style."""
    return {"colour": COLOUR_SHIFT[prompt_colour]}


def concept_scenes(count: int = CONCEPT_IMAGES) -> list[Scene]:
    """The concept's example scenes: fixed attributes, jittered position, size and rotation."""
    return make_scenes(_CONCEPT_SEED, count, outline=False, **CONCEPT)


def style_scenes(count: int = STYLE_IMAGES) -> list[tuple[Scene, Scene]]:
    """(asked, drawn) scene pairs: varied scenes with the colours taken in turn, and the same
    scene with its shape colour shifted."""
    pairs = []
    for index in range(count):
        asked = sample_scene(scene_rng(_STYLE_SEED, index), colour=_PALETTE[index % len(_PALETTE)], outline=False)
        pairs.append((asked, Scene(**{**asked.to_dict(), "colour": COLOUR_SHIFT[asked.colour]})))
    return pairs


def write_examples(root: str | Path) -> dict[str, Path]:
    """Write both example folders under `root` (normally the repository's `examples/`)."""
    root = Path(root)
    styles = style_scenes()
    return {
        "concept": write_example_folder(root / "concept", concept_scenes()),
        "style_colour_shift": write_example_folder(
            root / "style_colour_shift", [drawn for _, drawn in styles], [caption(asked) for asked, _ in styles]
        ),
    }
