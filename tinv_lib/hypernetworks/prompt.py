"""`<hypernet:NAME:MULTIPLIER>` in prompts, with A1111's "extra networks" semantics.

A1111 removes every `<type:args>` tag from the prompt text before encoding it (the tags stay in
the infotext prompt), splits the arguments on `:`, and for `hypernet` tags loads the
hypernetwork whose file stem is NAME from the hypernetwork folder, at MULTIPLIER (default 1.0).
Tags of other types (e.g. `lora`) are removed too and reported as skipped, as A1111 does when no
handler exists for them. Several hypernetwork tags apply in the order they appear.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from tinv_lib.common.errors import TinvError
from tinv_lib.common.training_folders import is_training_checkpoint
from tinv_lib.hypernetworks.files import load_hypernetwork
from tinv_lib.hypernetworks.module import Hypernetwork

logger = logging.getLogger(__name__)

EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
DEFAULT_MULTIPLIER = 1.0


def parse_extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """Remove every extra-network tag; return the clean prompt and `(type, args)` per tag.

    The text around a tag is left as it is (A1111 does not collapse the spaces either).
    """
    found: list[tuple[str, list[str]]] = []

    def take(match: re.Match) -> str:
        found.append((match.group(1), match.group(2).split(":")))
        return ""

    return EXTRA_NETWORK_TAG.sub(take, prompt), found


def parse_hypernet_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The clean prompt and the `(name, multiplier)` of each `<hypernet:...>` tag, in order."""
    clean, tags = parse_extra_networks(prompt)
    hypernets = []
    for kind, args in tags:
        if kind != "hypernet":
            logger.warning("Skipping unknown extra network: %s", kind)
            continue
        hypernets.append((args[0], _multiplier(args)))
    return clean, hypernets


def _multiplier(args: list[str]) -> float:
    if len(args) < 2:
        return DEFAULT_MULTIPLIER
    try:
        return float(args[1])
    except ValueError:
        raise TinvError(
            f"<hypernet:{':'.join(args)}>: multiplier {args[1]!r} is not a number"
        ) from None


def list_hypernetworks(folder: str | os.PathLike) -> dict[str, Path]:
    """A1111's listing: every `*.pt` below `folder` (recursive), by file stem.

    Paths are visited sorted case-insensitively and a later duplicate stem replaces an earlier
    one; `None.pt` is skipped (A1111 reserves the name for "no hypernetwork"), and so are the
    files of training checkpoints (a run's `optimizer.pt` is no hypernetwork).
    """
    folder = Path(folder)
    paths = sorted((p for p in folder.rglob("*.pt") if p.is_file() and not _in_checkpoint(p, folder)),
                   key=lambda p: str(p).lower())
    return {path.stem: path for path in paths if path.stem != "None"}


def _in_checkpoint(path: Path, folder: Path) -> bool:
    """Whether `path` lies in a training checkpoint folder below `folder`."""
    return any(is_training_checkpoint(folder / part) for part in path.relative_to(folder).parents if part.parts)


def extract_hypernetworks(
    prompt: str,
    hypernetwork_dir: str | os.PathLike,
    cache: dict[Path, tuple[tuple[int, int], Hypernetwork]] | None = None,
) -> tuple[str, list[tuple[Hypernetwork, float]]]:
    """The prompt without extra-network tags, and the hypernetworks its tags ask for.

    Names are file stems under `hypernetwork_dir`. A name with no file is skipped with a
    warning (A1111 skips it silently), so a prompt copied from elsewhere still renders. Pass
    the same `cache` dict between calls to load each unchanged file once.
    """
    clean, tags = parse_hypernet_tags(prompt)
    if not tags:
        return clean, []
    available = list_hypernetworks(hypernetwork_dir)
    stack = []
    for name, multiplier in tags:
        path = available.get(name)
        if path is None:
            logger.warning("hypernetwork %r not found in %s; skipped", name, hypernetwork_dir)
            continue
        stack.append((_load_cached(path, cache), multiplier))
    return clean, stack


def _load_cached(path: Path, cache: dict | None) -> Hypernetwork:
    """Load `path`, reusing the cached network while the file's mtime and size are unchanged."""
    if cache is None:
        return load_hypernetwork(path)
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    entry = cache.get(path)
    if entry is None or entry[0] != stamp:
        entry = (stamp, load_hypernetwork(path))
        cache[path] = entry
    return entry[1]
