"""What a preprocessing run has already finished, so that a re-run skips it.

After every output of one source file is written, a small JSON record goes to
`<dest>/.tinv_preprocess/<index>.json` (atomically, last): the source's name, size and mtime (and
those of its caption `.txt` when that is used), a hash of every option that shapes the outputs,
and the list of files written. A source is finished when its record matches all of that and every
listed file still exists. A run killed mid-source leaves no record for that source, so it is
simply redone. When the options or the source changed, the files listed in the old record that
the new run does not rewrite are removed, so a changed run never leaves stale crops behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tinv_lib.common.atomic import atomic_write_text

STATE_DIR = ".tinv_preprocess"


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable short hash of the options that decide what the outputs look like."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _stat(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def source_signature(source: Path, caption: Path | None) -> dict[str, Any]:
    """Identity of one source (and of its caption file when used): name, size and mtime."""
    return {"name": source.name, "file": _stat(source), "caption": _stat(caption) if caption else None}


def record_path(dest: Path, index: int) -> Path:
    """Where the record of the source at listing position `index` lives."""
    return dest / STATE_DIR / f"{index:05}.json"


def read_record(dest: Path, index: int) -> dict[str, Any] | None:
    """The record for `index`, or None if missing or unreadable (then the source is redone)."""
    try:
        record = json.loads(record_path(dest, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_finished(record: dict[str, Any] | None, dest: Path, signature: dict[str, Any], settings: str) -> bool:
    """True when `record` says this exact source was done with these options, files all present."""
    if not record or record.get("signature") != signature or record.get("settings") != settings:
        return False
    outputs = record.get("outputs")
    return isinstance(outputs, list) and all((dest / name).is_file() for name in outputs)


def write_record(dest: Path, index: int, signature: dict[str, Any], settings: str, outputs: list[str]) -> None:
    """Mark a source finished; call only after all of `outputs` are on disk."""
    record = {"signature": signature, "settings": settings, "outputs": outputs}
    atomic_write_text(record_path(dest, index), json.dumps(record, indent=1, ensure_ascii=False))


def remove_stale(dest: Path, record: dict[str, Any] | None, keep: set[str]) -> None:
    """Delete the files an older record lists that are not in `keep` (only names we wrote)."""
    if not record or not isinstance(record.get("outputs"), list):
        return
    for name in record["outputs"]:
        if isinstance(name, str) and name not in keep and os.path.basename(name) == name:
            (dest / name).unlink(missing_ok=True)
