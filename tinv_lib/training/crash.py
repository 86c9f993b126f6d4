"""When something unexpected breaks the training loop: keep the training, then say so in one line.

A bug, a driver error or a full disk used to end the run with a wall of traceback and nothing
saved since the last checkpoint. Now the loop first saves what it has (the embedding or
hypernetwork as `<name>.pt`, marked with its step, and a checkpoint to resume from), writes the
traceback to `crash-<date>.log` in the output folder, and ends with one line that names those
files. A failing preview is not a crash at all: it is reported once and previews are switched
off for the rest of the run (`preview_notice`).
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable
from pathlib import Path

from tinv_lib.common.errors import first_line

EXIT_CRASH = 1


def preview_notice(error: Exception, step: int) -> str:
    """The one notice for a preview that raised; the caller stops previewing."""
    return (f"notice: the preview at step {step} failed ({first_line(error, with_type=True)}); previews are off for the rest of "
            "this run, training goes on")


def write_crash_log(output_dir: Path, error: BaseException, step: int, rank: int, extra: str = "") -> Path:
    """The whole traceback, for a bug report: `crash-<date>.log` (`-rank<N>` on other ranks)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    path = output_dir / f"crash-{stamp}{f'-rank{rank}' if rank else ''}.log"
    text = f"training failed after step {step}\n\n{''.join(traceback.format_exception(error))}{extra}"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def save_after_crash(error: Exception, output_dir: Path, step: int, rank: int,
                     save: Callable[[], list[Path]] | None) -> str:
    """Run `save` (main process: the trained files and a checkpoint), log the traceback, and
    return the one-line message for the user."""
    saved: list[Path] = []
    save_error = None
    if save is not None:
        try:
            saved = save()
        except Exception as failure:  # noqa: BLE001 - report it next to the first error, never hide the first
            save_error = failure
    extra = "" if save_error is None else (
        "\nsaving the training state then failed too:\n\n" + "".join(traceback.format_exception(save_error)))
    log = write_crash_log(output_dir, error, step, rank, extra)
    if save_error is not None:
        kept = f"saving it failed too ({first_line(save_error, with_type=True)})"
    elif saved:
        kept = f"saved {', '.join(str(path) for path in saved)}"
    else:
        kept = "nothing saved on this process"
    return f"training failed after step {step} ({first_line(error, with_type=True)}); {kept}; traceback in {log}"
