"""Scoring generated images against a target: the quality metric no peer has.

A target is a partial ground truth, e.g. `{"shape": "star", "colour": "red"}` for a prompt, the
full labels of a concept for a textual-inversion embedding, or `{"colour": "orange"}` for a
colour-shift hypernetwork asked for red. An image matches when the judge finds every targeted attribute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from toy_world import judge as judge_lib
from toy_world.pipeline import DEFAULT_MODEL_DIR
from toy_world.world import ATTRIBUTES, Scene

JUDGE_SUBFOLDER = "judge"


def load_default_judge(model_dir: str | Path | None = None) -> judge_lib.JudgeNet:
    """The judge shipped with a toy model folder (default: the committed model)."""
    return judge_lib.load_judge(Path(model_dir or DEFAULT_MODEL_DIR) / JUDGE_SUBFOLDER)


def check_target(target: Mapping[str, str]) -> None:
    """Reject targets that name unknown attributes or classes."""
    for name, value in target.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r}; choose from {', '.join(ATTRIBUTES)}")
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(ATTRIBUTES[name])}")


def target_of(scene: Scene, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> dict[str, str]:
    """The target that a scene's ground truth sets for the given attributes."""
    labels = scene.labels()
    return {name: labels[name] for name in attributes}


def score_verdicts(verdicts: Sequence[Mapping[str, str]], targets: Sequence[Mapping[str, str]]) -> dict:
    """Match rates of judge verdicts against per-image targets.

    Returns `n`, `match` (fraction of images where every targeted attribute is right),
    `per_attribute` (fraction right per targeted attribute), `matches` (one bool per image) and
    `seen` (a count of what the judge saw per attribute, to show what went wrong).
    """
    if len(verdicts) != len(targets):
        raise ValueError(f"{len(verdicts)} verdicts for {len(targets)} targets")
    matches = [all(v.get(k) == x for k, x in t.items()) for v, t in zip(verdicts, targets)]
    names = sorted({name for target in targets for name in target})
    per_attribute = {}
    for name in names:
        relevant = [(v, t) for v, t in zip(verdicts, targets) if name in t]
        per_attribute[name] = sum(v[name] == t[name] for v, t in relevant) / len(relevant)
    seen = {name: dict(Counter(v[name] for v in verdicts).most_common()) for name in names}
    n = len(matches)
    return {"n": n, "match": sum(matches) / n if n else 0.0, "per_attribute": per_attribute,
            "matches": matches, "seen": seen}


def score_images(images, target: Mapping[str, str] | Sequence[Mapping[str, str]], judge=None) -> dict:
    """Judge `images` (PIL images or uint8 NHWC, 64 px) against one target or one per image.

    `judge` defaults to the committed model's judge. See `score_verdicts` for the result.
    """
    judge = judge or load_default_judge()
    verdicts = judge_lib.predict(judge, images)
    targets = [target] * len(verdicts) if isinstance(target, Mapping) else list(target)
    for t in targets:
        check_target(t)
    return score_verdicts(verdicts, targets)
