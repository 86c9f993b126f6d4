"""The toy world's vocabulary, its scenes and their captions.

A scene is everything the generator decides before drawing: shape, colour, background pattern
and colour, the outline style, and the jitter (position, size, rotation, pattern phase). Because
the scene is kept, every drawn image has exact ground truth, which is what lets the judge be
trained and what lets the quality benchmark say whether a prompt was followed.

Every word used in captions is a single token of `testing.tokenizer_build.COMMON_WORDS`, so the
text encoder sees one token per attribute.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")

# Shape colours: saturated and well apart, so a 64 px image names its colour without doubt.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 50, 190),
    "pink": (250, 140, 200),
    "white": (250, 250, 250),
}

# Background colours: muted tones named by words that never name a shape colour, so every colour
# word in a caption says unambiguously what it colours (a model this small cannot learn to bind
# one colour word to the shape or the background from its position in an hour of CPU). No black,
# so a black outline is always visible.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "silver": (200, 200, 210),
    "brown": (130, 85, 50),
    "teal": (30, 125, 125),
    "cyan": (80, 200, 215),
    "magenta": (175, 40, 140),
}

BACKGROUNDS = ("plain", "striped", "checkered", "dotted")

OUTLINE_COLOUR = (10, 10, 10)

# Circumscribed radius in pixels. The first toy model, trained on 12-20 px, drew the right colour
# always but the right shape in 69% of images, mostly mixing up stars, triangles and crosses whose
# points are then 1-2 latent pixels long; larger shapes give their points room on 16x16 latents.
# 14-22 px took 4400 diffusion steps (90 min) for 84% right shapes; 17-25 px got 94% in 3000
# steps on two thirds of the images (49 min), the change that brought the recipe under an hour.
RADIUS_RANGE = (17.0, 25.0)

# The judge's heads and their classes, in a fixed order (the judge's output layout).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": BACKGROUNDS,
    "background_colour": tuple(BACKGROUND_COLOURS),
    "outline": ("no", "yes"),
}

# Phrases that may open a caption, so prompt-template words ("a photo of ...") mean nothing
# to the model beyond "draw what follows".
CAPTION_PREFIXES = (
    "",
    "a photo of ",
    "a picture of ",
    "a rendering of ",
    "a drawing of ",
    "a painting of ",
    "an image of ",
    "a close up photo of ",
)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: what is drawn and exactly where."""

    shape: str
    colour: str
    background: str
    background_colour: str
    outline: bool = False
    cx: float = 32.0  # shape centre, pixels
    cy: float = 32.0
    radius: float = 16.0  # circumscribed radius, pixels
    rotation: float = 0.0  # degrees
    phase: float = 0.0  # background pattern offset, pixels

    def labels(self) -> dict[str, str]:
        """The judged attributes as class names (`ATTRIBUTES` order)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "background": self.background,
            "background_colour": self.background_colour,
            "outline": "yes" if self.outline else "no",
        }

    def to_dict(self) -> dict:
        """Plain dict for JSON sidecars."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Inverse of `to_dict` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def validate(scene: Scene) -> None:
    """Reject scenes outside the vocabulary or with an invisible shape (same colour as the ground)."""
    for name, value in scene.labels().items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(ATTRIBUTES[name])}")
    if scene.colour == scene.background_colour:
        raise ValueError(f"a {scene.colour} shape on a {scene.background_colour} background is invisible")


def sample_scene(rng: random.Random, outline_probability: float = 0.0, **fixed) -> Scene:
    """A random scene; attributes given in `fixed` (e.g. `shape="star"`) are kept.

    Position, size, rotation and pattern phase are always jittered, so fixed attributes still
    give varied images. The background colour never equals the shape colour.
    """
    shape = fixed.get("shape") or rng.choice(SHAPES)
    colour = fixed.get("colour") or rng.choice(tuple(COLOURS))
    background = fixed.get("background") or rng.choice(BACKGROUNDS)
    allowed = [c for c in BACKGROUND_COLOURS if c != colour]
    background_colour = fixed.get("background_colour") or rng.choice(allowed)
    outline = fixed["outline"] if "outline" in fixed else rng.random() < outline_probability
    radius = rng.uniform(*RADIUS_RANGE)
    margin = radius * 1.1 + 1.0  # the triangle reaches 1.1 radius
    scene = Scene(
        shape=shape,
        colour=colour,
        background=background,
        background_colour=background_colour,
        outline=bool(outline),
        cx=rng.uniform(margin, IMAGE_SIZE - margin),
        cy=rng.uniform(margin, IMAGE_SIZE - margin),
        radius=radius,
        rotation=rng.uniform(-15.0, 15.0),
        phase=rng.uniform(0.0, 8.0),
    )
    validate(scene)
    return scene


def background_phrase(background: str, background_colour: str) -> str:
    """"striped teal" / "teal" (plain backgrounds are named by their colour alone)."""
    return background_colour if background == "plain" else f"{background} {background_colour}"


def caption(scene: Scene, prefix: str = "", with_colour: bool = True, with_background: bool = True) -> str:
    """"a red star with a black outline on a striped teal background", optionally shortened.

    Shortened captions (no colour, no background) teach the model that an attribute not named is
    free, which is what an untrained embedding or an ordinary prompt relies on. The outline is
    always named when drawn, so prompts without the word give outline-free shapes.
    """
    noun = f"{scene.colour} {scene.shape}" if with_colour else scene.shape
    text = f"{prefix}{article(noun)} {noun}"
    if scene.outline:
        text += " with a black outline"
    if with_background:
        text += f" on a {background_phrase(scene.background, scene.background_colour)} background"
    return text


def article(phrase: str) -> str:
    """"a" or "an" for the phrase that follows."""
    return "an" if phrase[:1] in "aeiou" else "a"


def prompt_for(shape: str, colour: str, background: str, background_colour: str) -> str:
    """The benchmark's prompt form: "a {colour} {shape} on a {background} background"."""
    noun = f"{colour} {shape}"
    return f"{article(noun)} {noun} on a {background_phrase(background, background_colour)} background"
