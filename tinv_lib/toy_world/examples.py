"""The bundled example datasets: a concept for textual inversion and a style for hypernetworks.

* `examples/concept/`: 8 images of one combination (`CONCEPT`) that the model can draw but has
  no single word for. They carry no captions: the embedding has to learn the whole combination.
* `examples/style_outline/`: images of ordinary scenes all drawn with a black outline, captioned
  *without* the outline. A hypernetwork trained on them learns to add the outline to ordinary
  prompts, which the base model only draws when asked "with a black outline".

Both are deterministic from fixed seeds, and every image has a `.json` ground-truth sidecar.
"""

from __future__ import annotations

from pathlib import Path

from tinv_lib.toy_world.data import make_scenes, write_example_folder
from tinv_lib.toy_world.world import Scene, caption

CONCEPT = {"shape": "triangle", "colour": "pink", "background": "checkered", "background_colour": "teal"}
CONCEPT_IMAGES = 8
STYLE_IMAGES = 16
STYLE_TARGET = {"outline": "yes"}

_CONCEPT_SEED = 808
_STYLE_SEED = 909


def concept_scenes(count: int = CONCEPT_IMAGES) -> list[Scene]:
    """The concept's example scenes: fixed attributes, jittered position, size and rotation."""
    return make_scenes(_CONCEPT_SEED, count, outline=False, **CONCEPT)


def style_scenes(count: int = STYLE_IMAGES) -> list[Scene]:
    """Varied scenes, every one with a black outline."""
    return make_scenes(_STYLE_SEED, count, outline=True)


def write_examples(root: str | Path) -> dict[str, Path]:
    """Write both example folders under `root` (normally the repository's `examples/`)."""
    root = Path(root)
    styles = style_scenes()
    plain_captions = [caption(Scene(**{**s.to_dict(), "outline": False})) for s in styles]
    return {
        "concept": write_example_folder(root / "concept", concept_scenes()),
        "style_outline": write_example_folder(root / "style_outline", styles, plain_captions),
    }
