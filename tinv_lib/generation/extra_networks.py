"""The `<hypernet:name:multiplier>` handler: the one place a prompt's hypernetwork tags are applied
(`generate()` hands it every `<hypernet:...>` tag: generate.py and the benchmarks use it).

A1111 looks hypernetwork names up in its folder when a prompt uses them, so a file added while
the UI runs is usable at once; we do the same (the folder is listed at each use, and a file is
read again only when its mtime or size changed). Everything that keeps a tag from working — no
such file, a broken file, a multiplier that is not a number, a hypernetwork made for another
model family — is reported in one line and the image is made without it, as A1111 does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinv_lib.common.errors import TinvError

Notify = Callable[[str], None]


class HypernetworkHandler:
    """`handler(pipe, [args of each <hypernet:...> tag])` → a context manager that applies them."""

    def __init__(self, folder: str | os.PathLike, notify: Notify = print) -> None:
        self.folder = Path(folder)
        self.notify = notify
        self.applied: list[tuple[str, float]] = []
        self._cache: dict[Path, tuple[tuple[int, int], Any]] = {}

    def available(self) -> dict[str, Path]:
        """Hypernetwork files by name (A1111's listing rules); empty when the folder is missing."""
        from tinv_lib.hypernetworks import list_hypernetworks

        return list_hypernetworks(self.folder) if self.folder.is_dir() else {}

    def summary_line(self) -> str:
        """`Hypernetworks available(N): a, b` for the start-up report."""
        names = sorted(self.available(), key=str.lower)
        where = "" if self.folder.is_dir() else f" (no folder {self.folder})"
        return f"Hypernetworks available({len(names)}): {', '.join(names)}{where}"

    def _load(self, path: Path):
        from tinv_lib.hypernetworks import load_hypernetwork

        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load_hypernetwork(path).eval())
            self._cache[path] = cached
        return cached[1]

    def _network_for(self, args: list[str], available: dict[str, Path], widths: list[int]) -> tuple[Any, float] | None:
        """The network and multiplier one tag asks for, or None (with a notice) when unusable."""
        tag = f"<hypernet:{':'.join(args)}>"
        name = args[0]
        try:
            multiplier = float(args[1]) if len(args) > 1 else 1.0
        except ValueError:
            self.notify(f"{tag}: multiplier {args[1]!r} is not a number; skipped")
            return None
        path = available.get(name)
        if path is None:
            self.notify(f"{tag}: no hypernetwork {name!r} in {self.folder}; skipped")
            return None
        try:
            network = self._load(path)
        except TinvError as error:
            self.notify(f"{tag}: skipped: {error}")
            return None
        except Exception as error:  # noqa: BLE001 - a broken file is reported, never a traceback
            self.notify(f"{tag}: skipped: {path}: cannot load ({type(error).__name__})")
            return None
        if not set(network.sizes) & set(widths):
            self.notify(f"{tag}: skipped: its sizes {network.sizes} fit none of this model's attention widths {widths}")
            return None
        return network, multiplier

    def __call__(self, pipe: Any, tags: list[list[str]]) -> contextlib.AbstractContextManager[Any]:
        from tinv_lib.hypernetworks import apply_hypernetworks, context_widths
        from tinv_lib.hypernetworks.apply import refuse_flow_models
        from tinv_lib.models.family import family_of

        refuse_flow_models(type(pipe).__name__, family_of(pipe).architecture)
        available = self.available()
        widths = context_widths(pipe.unet)
        stack = []
        self.applied = []
        for args in tags:
            found = self._network_for(args, available, widths)
            if found is not None:
                stack.append(found)
                self.applied.append((args[0], found[1]))
        return apply_hypernetworks(pipe.unet, stack)
