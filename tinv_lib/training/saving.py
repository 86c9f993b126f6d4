"""The files a run writes from its trained state: intermediate, final and best (`--keep_best`)
trained files, and checkpoints.

Files always hold the weights a user would keep (`saved_weights`: schedule-free's evaluation
weights, or the moving average with `--save_ema`); checkpoints hold the training weights and
everything else an exact resume needs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinv_lib.training import checkpoints as ckpt
from tinv_lib.training.optimizers import evaluation_mode
from tinv_lib.training.task import TrainingRun


def save_intermediate(run: TrainingRun) -> None:
    """`--save_steps`: the trained file of this step, and the task's report on it."""
    with saved_weights(run):
        save_files(run, final=False)
        run.task.describe_saved(run.step, False, run.logger)


def save_final(run: TrainingRun, interrupted: bool) -> None:
    """The final trained file(s), what they hold, and how to go on after an interruption."""
    with saved_weights(run):
        written = save_files(run, final=True)
    if interrupted:
        print(f"Training interrupted at step {run.step}; resume with --resume_from_checkpoint latest", file=sys.stderr)
    print(f"Saved step {run.step}: {', '.join(str(path) for path in written)}")
    with saved_weights(run):
        run.task.describe_saved(run.step, True, run.logger)


def save_after_crash(run: TrainingRun) -> list[Path]:
    """After a crash: the trained file(s) as `<name>.pt` (marked with the step) and a checkpoint."""
    with saved_weights(run):
        written = save_files(run, final=True)
    return [*written, save_checkpoint(run)]


def save_best(run: TrainingRun) -> list[Path]:
    """`--keep_best`: this step's trained file as `<name>-best` (called inside `saved_weights`,
    where the fixed-batch loss that made it the best was measured)."""
    return run.task.save_files(run.output_dir, run.step, final=False, optimizer_state=None, best=True)


def save_files(run: TrainingRun, final: bool) -> list[Path]:
    """The task's trained file(s) for this step (with the optimizer state when asked to keep it)."""
    optimizer_state = run.optimizer.state_dict() if run.args.save_optimizer_state else None
    return run.task.save_files(run.output_dir, run.step, final=final, optimizer_state=optimizer_state)


def save_checkpoint(run: TrainingRun) -> Path:
    """`checkpoint-<step>`: the training weights, optimizer, scaler and moving average."""
    scaler = run.accelerator.scaler
    state = ckpt.CheckpointState(
        step=run.step, start_step=run.start_step, kind=run.task.kind, name=run.task.name,
        tensors=run.task.state_tensors(), optimizer=run.optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler else None, ema=run.ema.state() if run.ema else None,
        batch=run.batch_shape, architecture=run.model_info.arch, stream=run.plan.stream_state(),
        fixed_batch=run.progress.fixed_batch.state() if run.validation else None,
        norm_control=run.task.norm_control.state() if run.task.norm_control else None,
    )
    return ckpt.save_checkpoint(run.output_dir, state, run.args.checkpoints_total_limit, keep=run.resumed_from)


@contextmanager
def saved_weights(run: TrainingRun) -> Iterator[None]:
    """The trainables as saved files and previews show them: schedule-free's evaluation weights,
    or the moving average with `--save_ema`; the training weights are back afterwards."""
    with evaluation_mode(run.optimizer):
        if run.ema is None or not run.args.save_ema:
            yield
            return
        training = {name: tensor.clone() for name, tensor in run.task.state_tensors().items()}
        run.task.load_state_tensors(run.ema.average)
        try:
            yield
        finally:
            run.task.load_state_tensors(training)
