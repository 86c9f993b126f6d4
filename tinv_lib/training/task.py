"""What the training loop and a trainer agree on, and what the loop shows its observers.

`TrainingTask` is everything the loop asks of a trainer (textual inversion and hypernetworks
are the two); `TrainingRun` is a run once set up, as the loop's stages share it and as
`TrainingHooks` receive it: what set-up fixed (frozen) and its `RunProgress` (the few fields that
change per step). Hooks get a `StepReport` after each step, so tests and benchmarks observe a
run without patching the loop's functions or torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from tinv_lib.training.batches import MicroBatch, SampleSettings
from tinv_lib.training.checkpoints import BatchShape
from tinv_lib.training.data import BatchPlan, TrainingImage
from tinv_lib.training.early_stopping import FixedBatchHistory
from tinv_lib.training.ema import ExponentialMovingAverage
from tinv_lib.training.logs import RunLogger
from tinv_lib.training.lr_schedule import ScheduleString, StandardSchedule

if TYPE_CHECKING:
    import argparse

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from diffusers import SchedulerMixin

    from tinv_lib.models.family import ModelFamily
    from tinv_lib.models.loading import ModelInfo
    from tinv_lib.training.norm_control import NormControl


@dataclass
class PreviewRequest:
    """What a preview is asked to draw, and where its files go."""

    prompt: str
    negative: str
    seed: int
    steps: int
    cfg_scale: float
    size: tuple[int, int]  # (width, height)
    count: int
    output_dir: Path
    step: int


class TrainingTask(Protocol):
    """What a trainer plugs into the loop: everything the loop asks of it is declared here."""

    kind: str  # "textual_inversion" | "hypernetwork" (checkpoint compatibility, file names)
    name: str  # the embedding / hypernetwork name, also `[name]` in templates
    resumed_from: Path | None  # the trained file `setup` continued from, if any (reported at the start)
    optimizer_state: dict | None  # the optimizer state saved with that file (A1111's `.optim`), if any
    norm_control: NormControl | None  # `--norm_mode` (textual inversion): the loop projects and retracts

    def setup(self, family, model_info, args, device: torch.device) -> int:
        """Create or load the trainable state; return the step count it already has."""

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups; a group's `lr_scale` (default 1) multiplies the
        scheduled learning rate for its parameters."""

    def conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning (and SDXL pooled embeds), differentiable w.r.t. the trainables."""

    def set_training(self, training: bool) -> None: ...

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise before step 1 if the prompts cannot train anything."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def save_files(self, output_dir: Path, step: int, final: bool, optimizer_state: dict | None,
                   best: bool = False) -> list[Path]:
        """Write the trained artifact (intermediate, final, or `best`: `<name>-best`); return the paths written."""

    def describe_saved(self, step: int, final: bool, logger: RunLogger) -> None:
        """Report on what `save_files` just wrote (main process only; may do nothing)."""

    def preview(self, family, request: PreviewRequest) -> list:
        """Render preview images with the current state; return PIL images (the loop saves them)."""


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step did, as the loss CSV records it: what hooks observe."""

    step: int  # the step reached (after a rollback: the step rolled back to)
    loss: float  # mean over the step's micro-batches and processes
    lr: float  # the rate the step was taken at (after NaN rollbacks halved it)
    grad_norm: float  # before clipping; NaN for a rolled-back step
    rolled_back: bool = False  # the loss was not finite: the step was undone (`--on_nan rollback`)


@dataclass
class TrainingHooks:
    """Observers for benchmarks, tests and notebooks: called with the run, they change nothing by themselves."""

    on_start: Callable[[TrainingRun], None] | None = None  # once, after set-up and resume, before step 1
    on_step: Callable[[StepReport], None] | None = None  # after every optimizer step and every rollback
    # every step, before clipping and the optimizer step: the step about to be taken and the
    # trainables' gradients (read-only; the loop's own tensors, not copies)
    on_gradients: Callable[[int, list[torch.Tensor]], None] | None = None


@dataclass
class RunProgress:
    """Where a run stands: the only state that changes from step to step."""

    step: int
    snapshot: tuple = ()  # (step, trainable tensors, optimizer state, moving average, history) of the last good step
    lr_multiplier: float = 1.0  # halved by every NaN rollback
    rollbacks: int = 0
    previews_on: bool = True  # off for good once a preview failed
    fixed_batch: FixedBatchHistory = field(default_factory=FixedBatchHistory)  # losses, best step, early stop


@dataclass(frozen=True)
class TrainingRun:
    """A run once set up: the model, the data, the optimizer and the schedules, fixed for the
    whole run (the objects inside, e.g. the optimizer, keep their own state); `progress` is where
    the run stands."""

    args: argparse.Namespace
    task: TrainingTask
    accelerator: Accelerator
    family: ModelFamily
    model_info: ModelInfo
    weight_dtype: torch.dtype
    output_dir: Path
    images: list[TrainingImage]
    plan: BatchPlan
    batch: int  # images per process and micro-batch
    samples: SampleSettings
    params: list[torch.nn.Parameter]
    optimizer: AcceleratedOptimizer
    schedule: ScheduleString | StandardSchedule
    clip_norm: ScheduleString | None
    clip_value: ScheduleString | None
    noise_scheduler: SchedulerMixin
    logger: RunLogger
    start_step: int  # where this run's schedules started (kept across checkpoint resumes)
    end_step: int
    progress: RunProgress
    ema: ExponentialMovingAverage | None = None  # `--ema_decay`
    validation: list[MicroBatch] = field(default_factory=list)  # held-out images at fixed noise and timesteps
    resumed_from: Path | None = None  # the checkpoint this run resumed from (never pruned)

    @property
    def batch_shape(self) -> BatchShape:
        """This run's global batch, as checkpoints record it."""
        return BatchShape(self.batch, self.accelerator.num_processes, self.args.gradient_accumulation_steps)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def step(self) -> int:
        return self.progress.step

    def take_snapshot(self) -> None:
        """Remember this step as the one a NaN rolls back to."""
        tensors = {key: value.clone() for key, value in self.task.state_tensors().items()}
        ema = self.ema.state() if self.ema else None
        self.progress.snapshot = (self.step, tensors, copy.deepcopy(self.optimizer.state_dict()), ema,
                                  copy.deepcopy(self.progress.fixed_batch))

    def restore_snapshot(self) -> None:
        """Back to the step `take_snapshot` remembered: trainables, optimizer, moving average,
        fixed-batch history."""
        self.progress.step, tensors, optimizer_state, ema, history = self.progress.snapshot
        self.progress.fixed_batch = copy.deepcopy(history)
        self.task.load_state_tensors(tensors)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        if ema is not None:
            self.ema.load_state(*ema)
