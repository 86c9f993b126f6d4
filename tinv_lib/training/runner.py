"""The command-line runner both training scripts share, and the process set-up it starts with.

`prepare_process` is everything that changes the whole process rather than one run: the
libraries' known-irrelevant messages are silenced (and diffusers told not to import
bitsandbytes), and accelerate's process-wide singletons are cleared so the run follows its own
flags. The scripts get it through `run_script`; code that calls `loop.train` itself (tests,
benchmarks, notebooks) calls it before each run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tinv_lib.common.errors import TinvError
from tinv_lib.training.exits import TrainingStopped
from tinv_lib.training.loop import train


def prepare_process() -> None:
    """Silence the known library noise and give the next `train()` a fresh accelerate state.

    Accelerate keeps its precision and process settings in process-wide singletons: they are
    cleared so a second run in the same process does not inherit the first one's."""
    from accelerate.state import AcceleratorState, GradientState

    from tinv_lib.common.quiet import silence_known_noise

    silence_known_noise()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def run_script(parse_args: Callable, task_class: Callable, argv: list[str] | None = None) -> int:
    """What both training scripts do: parse (every flag checked before the model loads), train,
    turn errors into one line on stderr and an exit code."""
    prepare_process()
    try:
        args = parse_args(argv)
        return train(args, task_class(args))
    except TrainingStopped as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except TinvError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
