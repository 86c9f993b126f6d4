"""SIGTERM / SIGINT: finish the current step, save, exit with a conventional code.

Preemptible cloud machines get SIGTERM shortly before they vanish; Ctrl-C sends SIGINT. Either
sets a flag that the loop reads at the next step boundary (combined across processes), so the
run saves a checkpoint and the current file, then exits with 128 + the signal number (143 for
SIGTERM, 130 for SIGINT). A second signal restores the default behaviour: it kills at once,
and atomic writes still leave no truncated file.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager that turns SIGTERM/SIGINT into a flag while it is active."""

    def __init__(self) -> None:
        self.requested = False
        self.exit_code = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.requested = True
        self.exit_code = 128 + signum
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
