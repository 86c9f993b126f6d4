"""How a training run ends: the process exit codes, and the exception that carries one.

The loop returns 0, `EXIT_NAN` or `EXIT_STOPPED`, or raises `TrainingStopped` after a crash
(`EXIT_CRASH`, with the one line to print); the runner turns that into what the process returns.
"""

from __future__ import annotations

from tinv_lib.common.errors import TinvError

EXIT_CRASH = 1  # something broke inside the loop; the training was saved first (`crash`)
EXIT_NAN = 3  # the loss stayed non-finite; the last good files stay
EXIT_STOPPED = 128 + 15  # a SIGTERM's exit code, also on processes that did not receive it themselves


class TrainingStopped(TinvError):
    """Training ended early; `exit_code` tells the script what to return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
