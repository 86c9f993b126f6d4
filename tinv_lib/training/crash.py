"""When something unexpected breaks the training loop: keep the training, then say so in one line.

A bug, a driver error or a full disk used to end the run with a wall of traceback and nothing
saved since the last checkpoint. Now the loop first saves what it has (the embedding or
hypernetwork as `<name>.pt`, marked with its step, and a checkpoint to resume from), writes the
traceback to `crash-<date>.log` in the output folder, and ends with one line that names those
files. A failing preview is not a crash at all: it is reported once and previews are switched
off for the rest of the run (`preview_notice`).

With several processes only the main process writes files. A failure in a step's forward or
backward pass on any process is shared through the step's all-reduce (the loop's `failed` flag),
so every process learns it at the same point: the failing ones write their tracebacks, all of
them learn who failed (`Failure`), the main process saves the last good step, and no process
returns before that save is done (a launcher such as torchrun kills the others as soon as one
exits). Every process then exits with `EXIT_CRASH` and the same line. A failure elsewhere (a
collective that breaks because a peer died, a failing save) cannot be shared: that process saves
if it is the main one, and its peers fail at their next collective and exit non-zero too.
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinv_lib.common.errors import first_line


@dataclass(frozen=True)
class Failure:
    """One process's failure, as every process learns it."""

    rank: int
    summary: str  # `first_line` of the error
    log: Path  # its crash log, with the whole traceback


def preview_notice(error: Exception, step: int) -> str:
    """The one notice for a preview that raised; the caller stops previewing."""
    return (f"notice: the preview at step {step} failed ({first_line(error, with_type=True)}); previews are off for the rest of "
            "this run, training goes on")


def write_crash_log(output_dir: Path, error: BaseException, step: int, rank: int, heading: str = "",
                    path: Path | None = None) -> Path:
    """The whole traceback, for a bug report: `crash-<date>.log` (`-rank<N>` on other ranks), or
    appended to `path`, the log of the error a failing save came after."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    path = path or output_dir / f"crash-{stamp}{f'-rank{rank}' if rank else ''}.log"
    text = f"{heading or f'training failed after step {step}'}\n\n{''.join(traceback.format_exception(error))}"
    output_dir.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(text)
    return path


def record_failure(error: BaseException, output_dir: Path, step: int, rank: int) -> Failure:
    """Log `error`'s traceback; the failure as the other processes are told it."""
    return Failure(rank, first_line(error, with_type=True), write_crash_log(output_dir, error, step, rank))


def save_state(save: Callable[[], list[Path]], output_dir: Path, step: int, log: Path | None) -> str:
    """Run `save` (the main process's trained files and checkpoint); what was kept, in words.

    A save that fails too is logged after the first error (in `log`, the main process's own
    crash log if it has one) and named, never raised over it."""
    try:
        saved = save()
    except Exception as failure:  # noqa: BLE001 - report it next to the first error, never hide the first
        write_crash_log(output_dir, failure, step, 0, "\nsaving the training state then failed too:", log)
        return f"saving it failed too ({first_line(failure, with_type=True)})"
    return f"saved {', '.join(str(path) for path in saved)}" if saved else "nothing saved"


def crash_message(step: int, failures: list[Failure], kept: str, processes: int) -> str:
    """The one line every process prints: what failed where, what was saved, where the tracebacks are."""
    where = f" on process {', '.join(str(failure.rank) for failure in failures)}" if processes > 1 else ""
    logs = ", ".join(str(failure.log) for failure in failures)
    return f"training failed after step {step}{where} ({failures[0].summary}); {kept}; traceback in {logs}"
