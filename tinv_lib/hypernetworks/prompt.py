"""Which file a `<hypernet:NAME>` prompt tag names: A1111's listing of the hypernetwork folder.

The tag itself is read by the generic extra-network parser (`tinv_lib.prompts.syntax.
parse_extra_networks`) and applied by generation's handler (`tinv_lib.generation.extra_networks`);
this module only answers "which file is NAME".
"""

from __future__ import annotations

import os
from pathlib import Path

from tinv_lib.common.training_folders import is_training_checkpoint


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
