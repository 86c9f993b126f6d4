"""The training loop shared by textual inversion and hypernetworks.

One loop; what differs between the two trainers is a `TrainingTask` (which parameters train,
how prompts become conditioning, what files are written). `train` reads as its stages:
`_set_up` (model, data and cached latents, optimizer, resume, schedules) → `_train_steps`, for
each optimizer step: `_accumulate` the micro-batches (`batches`), `_mix_across_processes`,
`_roll_back` on a NaN or `_optimizer_step` (with `--norm_mode`, the task's `norm_control`
projects the gradients before it and retracts the vectors after it), then `_after_step` (files,
previews, the fixed-batch loss with `--keep_best` and `--early_stopping`, checkpoints) →
`_finish` (the final files). The neighbours do the rest: `banner` announces the run,
`saving` writes files and checkpoints, `previews` draws and saves previews, `crash` keeps the
training when something breaks, and `runner` is the command line around `train`.

Gradients are averaged across processes by one explicit all-reduce of the (small) trainable
tensors per step, which is also where the NaN, stop and failure flags of every rank are
combined, so all ranks always agree on what happens next (see `crash` for what a failure on one
process does).

`train` changes nothing process-wide: the entry point calls `runner.prepare_process` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinv_lib.training.batches import MicroBatch, build_micro_batch, seed_torch_for
from tinv_lib.training.crash import Failure, crash_message, record_failure, save_state
from tinv_lib.training.distributed import average_gradients
from tinv_lib.training.early_stopping import counts, dvar_settings
from tinv_lib.training.exits import EXIT_CRASH, EXIT_NAN, EXIT_STOPPED, TrainingStopped
from tinv_lib.training.objective import denoising_loss
from tinv_lib.training.previews import preview
from tinv_lib.training.run_setup import set_up
from tinv_lib.training.saving import (
    save_after_crash,
    save_best,
    save_checkpoint,
    save_final,
    save_intermediate,
    saved_weights,
)
from tinv_lib.training.signals import StopRequest
from tinv_lib.training.task import StepReport, TrainingHooks, TrainingRun, TrainingTask

VALIDATION_CSV = "validation_loss.csv"
MAX_ROLLBACKS = 10  # with --on_nan rollback: give up after this many (e.g. NaN in the data itself)


def train(args, task: TrainingTask, hooks: TrainingHooks | None = None) -> int:
    """Run a whole training job; return the process exit code (0 when finished)."""
    hooks = hooks or TrainingHooks()
    run = set_up(args, task)
    if hooks.on_start is not None:
        hooks.on_start(run)
    exit_code = _train_steps(run, hooks)
    return _finish(run, exit_code)


# ------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class _Mixed:
    """A step's outcome as every process agrees on it (`_mix_across_processes`)."""

    loss: float
    bad: bool  # some process's loss was not finite
    stop: bool  # some process was asked to stop
    failed: bool  # some process's forward or backward pass raised


class _SharedFailure(Exception):
    """A step failed on some process and every process learned it from the same all-reduce."""

    def __init__(self, error: BaseException | None):
        super().__init__()
        self.error = error  # this process's own error, if it is one of those that failed


def _train_steps(run: TrainingRun, hooks: TrainingHooks) -> int:
    """Optimizer steps until the end, a stop request or a NaN that cannot be rolled back; the
    exit code. Any exception first saves the trained file and a checkpoint (`crash`)."""
    stop_request = StopRequest()
    run.take_snapshot()
    run.task.set_training(True)
    try:
        with stop_request:
            while run.step < run.end_step and run.progress.fixed_batch.stopped_at is None:
                rate = run.schedule.rate_at(run.step)
                if rate is None:
                    break
                exit_code = _one_step(run, hooks, rate, stop_request)
                if exit_code is not None:
                    return exit_code
    except _SharedFailure as failure:
        raise _crash(run, failure.error, shared=True) from None
    except Exception as error:  # noqa: BLE001 - whatever broke the loop, the training is saved first
        raise _crash(run, error, shared=False) from None
    return 0


def _one_step(run: TrainingRun, hooks: TrainingHooks, rate: float, stop_request: StopRequest) -> int | None:
    """One optimizer step (or rollback) and what falls on it; an exit code when the run ends here."""
    error, loss_sum, prompts = None, math.nan, []
    try:
        loss_sum, prompts = _accumulate(run)
    except Exception as failure:  # noqa: BLE001 - shared with the other processes first, see `crash`
        if run.accelerator.num_processes == 1:
            raise
        error = failure
    mixed = _mix_across_processes(run.accelerator, run.params, loss_sum, not math.isfinite(loss_sum),
                                  stop_request.requested, error is not None)
    if mixed.failed:
        raise _SharedFailure(error)
    if mixed.bad:
        tried = rate * run.progress.lr_multiplier
        if not _roll_back(run, mixed.loss, rate):
            return EXIT_NAN
        if hooks.on_step is not None:
            hooks.on_step(StepReport(run.step, mixed.loss, tried, math.nan, rolled_back=True))
        return None
    if hooks.on_gradients is not None:
        hooks.on_gradients(run.step, [param.grad for param in run.params])
    grad_norm = _optimizer_step(run, rate)
    final = run.step >= run.end_step or mixed.stop
    report = StepReport(run.step, mixed.loss, rate * run.progress.lr_multiplier, grad_norm)
    run.logger.step(report.step, report.loss, report.lr, report.grad_norm, last=final)
    if hooks.on_step is not None:
        hooks.on_step(report)
    if _after_step(run, prompts, final):
        return 0  # early stopping: the run ends as a finished one
    if mixed.stop:  # here or on another process: every process exits as if signalled
        return stop_request.exit_code or EXIT_STOPPED
    return None


def _accumulate(run: TrainingRun) -> tuple[float, list[str]]:
    """Forward and backward over the step's micro-batches: (mean loss, the last prompts)."""
    accumulation = run.args.gradient_accumulation_steps
    loss_sum, prompts = 0.0, []
    for micro in range(accumulation):
        k = run.step * accumulation + micro
        seed_torch_for(run.samples, k, run.rank)
        _, members = run.plan.batch(k)
        mine = list(enumerate(members))[run.rank * run.batch:(run.rank + 1) * run.batch]
        micro_batch = build_micro_batch(run.images, mine, k, run.samples)
        loss = _loss(run, micro_batch, run.args.snr_gamma)
        run.accelerator.backward(loss / accumulation)
        loss_sum += loss.item() / accumulation
        prompts = micro_batch.prompts
    return loss_sum, prompts


def _loss(run: TrainingRun, batch: MicroBatch, snr_gamma: float | None) -> torch.Tensor:
    """`objective.denoising_loss` of a micro-batch, conditioned through the task, in the run's precision."""
    device = run.device
    with run.accelerator.autocast():
        conditioning = run.task.conditioning(batch.prompts)
        return denoising_loss(run.family, run.noise_scheduler, batch.latents.to(device), batch.noise.to(device),
                              batch.timesteps.to(device), conditioning, batch.sizes, run.weight_dtype,
                              pixel_weights=batch.weights.to(device), snr_gamma=snr_gamma)


def _mix_across_processes(accelerator, params, loss_sum: float, bad: bool, stop: bool, failed: bool) -> _Mixed:
    """Average gradients and the loss over processes; any rank's NaN, stop or failure counts for all.

    The flags go first, in one all-reduce every rank joins even when its step failed: after a
    failure the gradients (missing or half accumulated on the failing rank) are left alone."""
    world = accelerator.num_processes
    if world == 1:
        return _Mixed(loss_sum, bad, stop, failed)
    flags = torch.tensor([0.0 if failed else loss_sum, float(bad), float(stop), float(failed)], dtype=torch.float64,
                         device=accelerator.device)
    torch.distributed.all_reduce(flags)
    if flags[3].item() > 0:
        return _Mixed(math.nan, False, False, True)
    average_gradients(params, world)
    return _Mixed(flags[0].item() / world, flags[1].item() > 0, flags[2].item() > 0, False)


def _roll_back(run: TrainingRun, loss: float, rate: float) -> bool:
    """After a non-finite loss: back to the last checkpointed state at half the learning rate;
    False when `--on_nan stop` or too many rollbacks say to give up instead."""
    progress = run.progress
    run.optimizer.zero_grad(set_to_none=True)
    progress.rollbacks += 1
    if run.args.on_nan == "stop" or progress.rollbacks > MAX_ROLLBACKS:
        if run.is_main:
            fp16 = ", or fp16 overflowed (try --mixed_precision bf16 or no)" if run.weight_dtype == torch.float16 else ""
            gave_up = f"rolled back {MAX_ROLLBACKS} times; " if progress.rollbacks > 1 else ""
            run.logger.notice(f"error: loss became {loss} at step {run.step}: the learning rate ({rate}) is likely too "
                              f"high{fp16}; {gave_up}stopped without saving over the last good files")
        return False
    run.restore_snapshot()
    progress.lr_multiplier *= 0.5
    run.logger.notice(f"notice: loss became {loss}; rolled back to step {run.step}, "
                      f"learning rate now x{progress.lr_multiplier}")
    return True


def _optimizer_step(run: TrainingRun, rate: float) -> float:
    """Unscale, clip, step at the scheduled rate; the gradient norm before clipping."""
    run.accelerator.unscale_gradients()
    norm_control = run.task.norm_control
    if norm_control is not None:
        norm_control.project_gradients()
    max_norm = run.clip_norm.rate_at(run.step) if run.clip_norm else None
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm if max_norm else float("inf")).item()
    if run.clip_value and run.clip_value.rate_at(run.step):
        torch.nn.utils.clip_grad_value_(run.params, run.clip_value.rate_at(run.step))
    for group in run.optimizer.param_groups:
        group["lr"] = rate * run.progress.lr_multiplier * group.get("lr_scale", 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if norm_control is not None:
        norm_control.retract()
    if run.ema is not None:
        run.ema.update(run.task.state_tensors())
    run.progress.step += 1
    return grad_norm


def _after_step(run: TrainingRun, prompts: list[str], final: bool) -> bool:
    """Intermediate files, previews, the fixed-batch loss and checkpoints that fall on this step;
    True when early stopping ends the run here (its checkpoint is then written as a last one's)."""
    args, step = run.args, run.step
    if args.save_steps and step % args.save_steps == 0 and not final and run.is_main:
        save_intermediate(run)
    if run.progress.previews_on and step % args.validation_steps == 0:
        run.progress.previews_on = preview(run, prompts[0] if prompts else run.task.name)
    stop = False
    if run.validation and (step % args.validation_loss_steps == 0 or final):
        stop = _agreed(run, _fixed_batch_loss(run, final) if run.is_main else False)
        final = final or stop
    if args.checkpointing_steps and (step % args.checkpointing_steps == 0 or final):
        if run.is_main:
            save_checkpoint(run)
        run.accelerator.wait_for_everyone()
        run.take_snapshot()
    return stop


def _fixed_batch_loss(run: TrainingRun, final: bool) -> bool:
    """The fixed-batch loss (`validation`) of the weights files would hold: logged, then, at the
    steps that count (`early_stopping.counts`), kept in the history, its best step written with
    `--keep_best`, and DVAR's rule applied; True when early stopping ends the run here."""
    args, step, history = run.args, run.step, run.progress.fixed_batch
    run.task.set_training(False)
    try:
        with saved_weights(run):
            with torch.no_grad():
                losses = [_loss(run, batch, None).item() for batch in run.validation]
            loss = sum(losses) / len(losses)
            counted = counts(step, args.validation_loss_steps, run.end_step)
            if counted and history.add(step, loss) and args.keep_best:
                save_best(run)
    finally:
        run.task.set_training(True)
    ratio, stop = None, False
    if args.early_stopping and counted:
        window, evaluations, threshold = dvar_settings(args)
        ratio = history.ratio(evaluations)
        stop = ratio is not None and ratio < threshold and not final
        if stop:
            history.stopped_at = step
            run.logger.notice(f"early stopping at step {step}: the fixed-batch loss's variance over the last {window} "
                              f"steps is {ratio:.3f} of its variance over the run (below {threshold})")
    _log_fixed_batch_loss(run, loss, ratio)
    return stop


def _log_fixed_batch_loss(run: TrainingRun, loss: float, ratio: float | None) -> None:
    """TensorBoard's `loss/validation` (and `early_stopping/dvar_ratio`), `validation_loss.csv`."""
    values, columns, row = {"loss/validation": loss}, ["step", "validation_loss"], [run.step, f"{loss:.7f}"]
    if run.args.early_stopping:
        if ratio is not None:
            values["early_stopping/dvar_ratio"] = ratio
        columns.append("dvar_ratio")
        row.append("" if ratio is None else f"{ratio:.6f}")
    run.logger.scalars(run.step, values)
    run.logger.table(VALIDATION_CSV, columns, [row])


def _agreed(run: TrainingRun, stop: bool) -> bool:
    """The main process's decision (it alone measures the fixed-batch loss), told to every process."""
    if run.accelerator.num_processes == 1:
        return stop
    box = [stop]
    torch.distributed.broadcast_object_list(box, src=0)
    return bool(box[0])


# ------------------------------------------------------------------------------ the end


def _crash(run: TrainingRun, error: BaseException | None, shared: bool) -> TrainingStopped:
    """Keep the training after `error` broke the loop; the exception that ends the run.

    `shared`: every process learned of the failure from the same all-reduce, so they can meet
    once more to learn who failed and wait for the main process's save (`crash`)."""
    run.task.set_training(False)
    mine = record_failure(error, run.output_dir, run.step, run.rank) if error is not None else None
    failures = _gather_failures(mine) if shared else [mine]
    log = mine.log if mine is not None else None
    kept = save_state(lambda: save_after_crash(run), run.output_dir, run.step, log) if run.is_main else None
    if shared:
        kept = _from_main(kept)
        run.accelerator.end_training()  # the process group ends cleanly (no abort at exit)
    run.logger.close()
    message = crash_message(run.step, failures, kept or "nothing saved on this process",
                            run.accelerator.num_processes)
    return TrainingStopped(message, EXIT_CRASH)


def _gather_failures(mine: Failure | None) -> list[Failure]:
    """Every process's failure (one collective all processes join), in rank order."""
    gathered: list[Failure | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return [failure for failure in gathered if failure is not None]


def _from_main(kept: str | None) -> str:
    """What the main process saved, told to every process once the save is done."""
    box = [kept]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _finish(run: TrainingRun, exit_code: int) -> int:
    """The final files (not after a NaN: the last good files stay), then close the run."""
    run.task.set_training(False)
    if exit_code != EXIT_NAN and run.is_main:
        save_final(run, interrupted=bool(exit_code))
    run.logger.close()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return exit_code
