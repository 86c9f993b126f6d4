"""Learning rates as a pure function of the optimizer step.

`--learning_rate` takes a float or A1111's schedule string `"0.005:100, 1e-3:1000, 1e-5"`
(docs/formats.md, "Learning-rate schedule strings", reproduced exactly: parsing, the
one-advance-per-step runtime, early finish,
the error message). A plain float may instead follow one of diffusers' standard schedulers
(`--lr_scheduler cosine --lr_warmup_steps 100`). Either way the rate at step `s` depends only on
`s` and the run's start step, so resuming from a checkpoint needs no scheduler state.

The text is parsed once, while the command line is parsed (`training.arguments`); the loop asks
that schedule for the run's start step (`resumed_at`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from tinv_lib.common.errors import TinvError

INVALID_SCHEDULE = (
    'Invalid learning rate schedule. It should be a number or, for example, like '
    '"0.001:100, 0.00001:1000, 1e-5:10000" to have lr of 0.001 until step 100, 0.00001 until 1000, '
    "and 1e-5 until 10000."
)


class ScheduleError(TinvError):
    """A learning-rate (or clip-value) schedule string cannot be parsed."""


def parse_schedule(text: str, max_steps: int, start_step: int = 0) -> list[tuple[float, int]]:
    """A1111's parser: `(rate, end_step)` pairs for a run resuming at `start_step`."""
    pairs: list[tuple[float, int]] = []
    try:
        for item in text.split(","):
            parts = item.strip().split(":")
            if parts == [""]:
                continue
            if len(parts) == 2:
                rate, step = float(parts[0].strip()), int(parts[1].strip())
                if step > start_step:
                    pairs.append((rate, min(step, max_steps)))
                    if step > max_steps:
                        break
                elif step == -1:
                    pairs.append((rate, max_steps))
                    break
            else:
                pairs.append((float(parts[0].strip()), max_steps))
                break
    except ValueError as error:
        raise ScheduleError(f"{INVALID_SCHEDULE} ({error})") from None
    if not pairs:
        raise ScheduleError(f"{INVALID_SCHEDULE} (no rate applies after step {start_step})")
    return pairs


@dataclass(frozen=True)
class Segment:
    """Steps `first..last` (inclusive) are trained at `rate`."""

    first: int
    last: int
    rate: float


def _merge_adjacent(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].rate == segment.rate and merged[-1].last + 1 == segment.first:
            merged[-1] = Segment(merged[-1].first, segment.last, segment.rate)
        else:
            merged.append(segment)
    return merged


class ScheduleString:
    """A1111's `LearnRateScheduler` runtime, precomputed as segments.

    Before each update at step `s`, A1111 advances to the next pair once if `s >= end_step`,
    and finishes when no pair is left; the run may finish before `max_steps`. `str()` gives the
    text back as the user typed it (settings files, trackers).
    """

    def __init__(self, text: str, max_steps: int, start_step: int = 0):
        self.text, self.max_steps = str(text), max_steps
        self.pairs = parse_schedule(self.text, max_steps, start_step)
        self._lay_out(start_step)

    def __str__(self) -> str:
        return self.text

    def resumed_at(self, start_step: int) -> ScheduleString:
        """This schedule for a run resuming at `start_step`, without parsing the text again.

        A1111 parses the text anew at the resume step and drops the pairs whose step has passed;
        for a schedule parsed at step 0 that is the same as keeping the pairs that end after
        `start_step`. A run already at its last step keeps the last pair (it trains no more)."""
        if start_step == self.start_step:
            return self
        if self.start_step != 0:
            raise ValueError("only a schedule parsed at step 0 can be resumed elsewhere")
        resumed = copy.copy(self)
        resumed.pairs = [pair for pair in self.pairs if pair[1] > start_step]
        if start_step >= self.max_steps:
            resumed.pairs = self.pairs[-1:]
        if not resumed.pairs:
            raise ScheduleError(f"{INVALID_SCHEDULE} (no rate applies after step {start_step})")
        resumed._lay_out(start_step)
        return resumed

    def _lay_out(self, start_step: int) -> None:
        """The pairs as segments of steps, following A1111's one-advance-per-step runtime."""
        self.start_step = start_step
        self.segments = []
        rate, end = self.pairs[0]
        remaining = iter(self.pairs[1:])
        step = start_step
        while True:
            if step >= end:
                try:
                    rate, end = next(remaining)
                except StopIteration:
                    break
                self.segments.append(Segment(step, step, rate))
                step += 1
                continue
            self.segments.append(Segment(step, end - 1, rate))
            step = end
        self.end_step = step
        self.segments = _merge_adjacent(self.segments)

    def rate_at(self, step: int) -> float | None:
        """Rate of the update made at `step`, or None when the schedule has finished."""
        for segment in self.segments:
            if segment.first <= step <= segment.last:
                return segment.rate
        return None

    def describe(self) -> list[str]:
        """A1111's console lines, one per pair."""
        return [f"Training at rate of {rate} until step {end}" for rate, end in self.pairs]


class StandardSchedule:
    """A base rate shaped by a diffusers scheduler (`constant`, `cosine`, `linear`, ...)."""

    def __init__(self, base_rate: float, name: str, warmup_steps: int, max_steps: int, **options):
        import torch
        from diffusers.optimization import get_scheduler

        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_rate)
        try:
            scheduler = get_scheduler(
                name, dummy, num_warmup_steps=warmup_steps, num_training_steps=max_steps, **options
            )
        except ValueError as error:
            raise ScheduleError(f"--lr_scheduler {name}: {error}") from None
        self.base_rate = base_rate
        self._factor = scheduler.lr_lambdas[0]
        self.end_step = max_steps
        self.text = str(base_rate)

    def __str__(self) -> str:
        return self.text

    def resumed_at(self, start_step: int) -> StandardSchedule:
        """The rate is a pure function of the step: the same schedule."""
        return self

    def rate_at(self, step: int) -> float | None:
        return self.base_rate * self._factor(step) if step < self.end_step else None

    def describe(self) -> list[str]:
        return [f"Training at base rate {self.base_rate} until step {self.end_step}"]


def build_schedule(
    text: str, max_steps: int, start_step: int = 0, scheduler: str = "constant", warmup_steps: int = 0
) -> ScheduleString | StandardSchedule:
    """The schedule for `--learning_rate text`, `--lr_scheduler`, `--lr_warmup_steps`."""
    text = str(text)
    is_plain_number = ":" not in text and "," not in text.strip().strip(",")
    if scheduler == "constant" and warmup_steps == 0:
        return ScheduleString(text, max_steps, start_step)
    if not is_plain_number:
        raise ScheduleError(
            f"--learning_rate {text!r} is a schedule string; it cannot be combined with "
            f"--lr_scheduler {scheduler} / --lr_warmup_steps (use one or the other)"
        )
    try:
        base = float(text)
    except ValueError:
        raise ScheduleError(f"{INVALID_SCHEDULE} (could not convert {text!r} to a number)") from None
    schedule = StandardSchedule(base, scheduler, warmup_steps, max_steps)
    schedule.text = text
    return schedule
