"""Early stopping and the best step, both read off the fixed-batch loss.

The fixed-batch loss is `validation`'s: the same images at the same noise and timesteps at every
evaluation (every `--validation_loss_steps` steps), so it moves only when the trainables do.
Its images are the held-out ones (`--validation_split`, `--validation_data_dir`) or, when none
are held out, the training images themselves, as in DVAR (Voronov et al., "Is This Loss
Informative? Faster Text-to-Image Customization by Tracking Objective Dynamics", arXiv
2302.04841, which evaluates its fixed batch of training inputs).

`--early_stopping dvar` stops when the loss has settled: the variance of the losses of the last
`--early_stopping_window` steps, over the variance of all losses so far, falls below
`--early_stopping_threshold` (population variances, as the paper's code; its defaults: a window
of 200 steps evaluated at every step, threshold 0.15). Here the window is counted in steps and
holds `window // --validation_loss_steps` evaluations, so the rule means the same at any
evaluation interval. `--keep_best` writes the trained file of the step with the lowest
fixed-batch loss as `<name>-best` (`saving.save_best`).

Only evaluations at multiples of `--validation_loss_steps` (and at `--max_train_steps`) count:
an interrupted run also logs the loss at the step it stopped, and counting that would make a
resumed run differ from the uninterrupted one. The history is in every checkpoint.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

DVAR_WINDOW_STEPS = 200  # the paper's window (its code's default)
DVAR_THRESHOLD = 0.15  # the paper's threshold (its code's default)


def dvar_ratio(losses: Sequence[float], window: int) -> float | None:
    """var(the last `window` losses) / var(all losses); None until there are `window` losses.

    A sequence that never moved (variance 0) has settled: 0."""
    if window < 2 or len(losses) < window:
        return None
    total = statistics.pvariance(losses)
    if total == 0:
        return 0.0
    return statistics.pvariance(losses[-window:]) / total


@dataclass
class FixedBatchHistory:
    """Every counted fixed-batch loss of a run, its best step and whether the run stopped early."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float | None = None
    stopped_at: int | None = None  # the step early stopping ended the run at

    def add(self, step: int, loss: float) -> bool:
        """Record the loss of `step`; True when it is the lowest so far (the first is)."""
        self.steps.append(step)
        self.losses.append(loss)
        if self.best_loss is None or loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            return True
        return False

    def ratio(self, evaluations: int) -> float | None:
        """`dvar_ratio` over the last `evaluations` losses."""
        return dvar_ratio(self.losses, evaluations)

    def state(self) -> dict:
        """Plain data for a checkpoint's `state.json` (floats survive JSON exactly)."""
        return {"steps": self.steps, "losses": self.losses, "best_step": self.best_step,
                "best_loss": self.best_loss, "stopped_at": self.stopped_at}

    @classmethod
    def from_state(cls, state: dict | None) -> FixedBatchHistory:
        if not state:
            return cls()
        return cls(list(state["steps"]), [float(x) for x in state["losses"]], state["best_step"],
                   state["best_loss"], state["stopped_at"])


def window_evaluations(window_steps: int, every: int) -> int:
    """The evaluations a window of `window_steps` steps holds at one evaluation every `every` steps."""
    return window_steps // every


def dvar_settings(args) -> tuple[int, int, float]:
    """(window in steps, in evaluations, threshold) of `--early_stopping dvar`, defaults filled in."""
    window = args.early_stopping_window if args.early_stopping_window is not None else DVAR_WINDOW_STEPS
    threshold = args.early_stopping_threshold if args.early_stopping_threshold is not None else DVAR_THRESHOLD
    return window, window_evaluations(window, args.validation_loss_steps), threshold


def counts(step: int, every: int, end_step: int) -> bool:
    """Whether the fixed-batch loss of `step` enters the history (see the module's docstring)."""
    return step % every == 0 or step == end_step
