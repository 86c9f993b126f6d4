"""The training loop shared by textual inversion and hypernetworks.

One loop; what differs between the two trainers is a `TrainingTask` (which parameters train,
how prompts become conditioning, what files are written). `train` reads as its stages:
`_set_up` (model, data and cached latents, optimizer, resume, schedules) → `_train_steps`, for
each optimizer step: `_accumulate` the micro-batches (`batches`), `_mix_across_processes`,
`_roll_back` on a NaN or `_optimizer_step`, then `_after_step` (files, previews, checkpoints)
→ `_finish` (the final files).

Nothing is lost to a crash: a preview that fails is reported once and previews stop, and any
other exception inside the loop first saves the trained file and a checkpoint (`crash`).

Gradients are averaged across processes by one explicit all-reduce of the (small) trainable
tensors per step, which is also where the NaN and stop flags of every rank are combined, so all
ranks always agree on what happens next.
"""

from __future__ import annotations

import datetime
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tinv_lib.common.atomic import atomic_path, atomic_write_text
from tinv_lib.common.errors import TinvError
from tinv_lib.training import checkpoints as ckpt
from tinv_lib.training.batches import MicroBatch, SampleSettings, build_micro_batch, seed_torch_for
from tinv_lib.training.crash import EXIT_CRASH, preview_notice, save_after_crash
from tinv_lib.training.data import (
    BatchPlan,
    MaskOptions,
    build_prompt,
    encode_latents,
    load_images,
    load_template,
)
from tinv_lib.training.distributed import average_gradients
from tinv_lib.training.ema import ExponentialMovingAverage
from tinv_lib.training.frozen_model import load_frozen_model
from tinv_lib.training.logs import RunLogger
from tinv_lib.training.lr_schedule import ScheduleString
from tinv_lib.training.objective import sample_weights
from tinv_lib.training.optimizers import build_optimizer, evaluation_mode
from tinv_lib.training.signals import StopRequest
from tinv_lib.training.task import PreviewRequest, TrainingHooks, TrainingRun, TrainingTask
from tinv_lib.training.validation import split_off, validation_batches

EXIT_NAN = 3
EXIT_STOPPED = 128 + 15  # a SIGTERM's exit code, also on processes that did not receive it themselves
VALIDATION_CSV = "validation_loss.csv"
MAX_ROLLBACKS = 10  # with --on_nan rollback: give up after this many (e.g. NaN in the data itself)


class TrainingStopped(TinvError):
    """Training ended early; `exit_code` tells the script what to return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(args, task: TrainingTask, hooks: TrainingHooks | None = None) -> int:
    """Run a whole training job; return the process exit code (0 when finished)."""
    from tinv_lib.common.quiet import silence_known_noise

    silence_known_noise()  # also when train() is called without run_script (benchmarks, notebooks)
    hooks = hooks or TrainingHooks()
    run = _set_up(args, task)
    if hooks.on_start is not None:
        hooks.on_start(run)
    exit_code = _train_steps(run, hooks)
    return _finish(run, exit_code)


# ------------------------------------------------------------------------------ set-up


def _set_up(args, task: TrainingTask) -> TrainingRun:
    """Model, data, optimizer, resume, schedules and the run's announcement, in that order."""
    from accelerate.utils import set_seed

    started = time.perf_counter()  # the closing line says how long the whole run took
    accelerator = _fresh_accelerator(args.mixed_precision)
    device, weight_dtype = accelerator.device, _weight_dtype(accelerator.mixed_precision)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        ckpt.remove_partial_files(output_dir)
    family, model_info = load_frozen_model(args.pretrained_model_name_or_path, args.model_config, device,
                                           weight_dtype, args.gradient_checkpointing)
    file_step = task.setup(family, model_info, args, device)
    images, held_out, templates, messages = _load_data(args, task, family, model_info, device)
    world, noise_scheduler = accelerator.num_processes, family.noise_scheduler()
    batch = min(args.train_batch_size, max(1, len(images) // world))
    plan = BatchPlan([im.size for im in images], batch * world, args.gradient_accumulation_steps, args.seed)
    params = task.parameters()
    optimizer = build_optimizer(params, args)
    resumed = _resume(args, task, optimizer, output_dir, file_step)
    optimizer = accelerator.prepare(optimizer)
    if resumed.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed.scaler)
    schedule = args.learning_rate.resumed_at(resumed.start_step)  # parsed with the command line
    samples = _sample_settings(args, task, family, templates, noise_scheduler)
    run = TrainingRun(
        args=args, task=task, accelerator=accelerator, family=family, model_info=model_info,
        weight_dtype=weight_dtype, output_dir=output_dir, images=images, plan=plan, batch=batch, samples=samples,
        params=params, optimizer=optimizer, schedule=schedule,
        clip_norm=_clip_schedule(args.max_grad_norm, resumed.start_step),
        clip_value=_clip_schedule(args.clip_grad_value, resumed.start_step),
        noise_scheduler=noise_scheduler,
        logger=RunLogger(output_dir, task.kind, args, accelerator.is_main_process, plan.steps_per_epoch,
                         resume_step=resumed.step if resumed.checkpoint else None, started=started),
        start_step=resumed.start_step, step=resumed.step, end_step=min(args.max_train_steps, schedule.end_step),
        previews_on=bool(args.validation_steps), ema=_moving_average(args, task, resumed),
        resumed_from=resumed.checkpoint,
        validation=validation_batches(held_out, templates[0], task.name, samples.timesteps[1], family.latent_scale),
    )
    if run.is_main:
        _announce(run, messages, file_step, resumed.checkpoint)
        if resumed.batch is not None and resumed.batch.size != run.batch_shape.size:
            print(f"notice: {resumed.checkpoint.name} was trained with a global batch of {resumed.batch.describe()}; "
                  f"this run's is {run.batch_shape.describe()}: from step {run.step} on, the data order differs "
                  "from the uninterrupted run's")
    return run


def _sample_settings(args, task: TrainingTask, family, templates: list[str], noise_scheduler) -> SampleSettings:
    """What the samples depend on besides the images; the timestep range checked against the model."""
    last = noise_scheduler.config.num_train_timesteps
    if args.max_timestep is not None and args.max_timestep > last:
        raise TinvError(f"--max_timestep {args.max_timestep}: this model has {last} timesteps")
    if args.min_timestep >= (args.max_timestep or last):
        raise TinvError(f"--min_timestep {args.min_timestep}: this model has {last} timesteps")
    return SampleSettings(args.seed, templates, task.name, args.shuffle_tags, args.tag_dropout, args.flip_p,
                          args.latent_sampling, family.latent_scale, (args.min_timestep, args.max_timestep or last),
                          args.noise_offset, args.caption_dropout)


def _moving_average(args, task: TrainingTask, resumed: _Resumed) -> ExponentialMovingAverage | None:
    """`--ema_decay`: the average continues the checkpoint's, or starts at the current weights."""
    if args.ema_decay is None:
        return None
    ema = ExponentialMovingAverage(task.state_tensors(), args.ema_decay)
    if resumed.ema is not None:
        ema.load_state(*resumed.ema)
    elif resumed.checkpoint is not None:
        print(f"notice: {resumed.checkpoint} holds no moving average; it starts at step {resumed.step}", file=sys.stderr)
    return ema


def _fresh_accelerator(mixed_precision: str | None):
    """An `Accelerator` that follows this run's flags and environment.

    Accelerate keeps its precision settings in process-wide singletons: they are cleared so a
    second run in the same process (tests, notebooks) does not inherit the first one's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _load_data(args, task: TrainingTask, family, model_info, device):
    """(training images and held-out images, with their latents cached; template lines; messages)."""
    templates = load_template(args.template_file)
    images, skipped, notices = _read_images(args, family, Path(args.train_data_dir))
    held_out = []
    if args.validation_data_dir:
        held_out, more_skipped, _ = _read_images(args, family, Path(args.validation_data_dir))
        skipped += more_skipped
    elif args.validation_split:
        images, held_out = split_off(images, args.validation_split, args.seed)
    task.check_prompts([build_prompt(t, im.caption, task.name, random.Random(0), False, 0.0) for im in images for t in templates])
    flips = (False, True) if args.flip_p > 0 else (False,)
    cache_dir = Path(args.latent_cache_dir) if args.latent_cache_dir else None
    encode_latents(images, family.vae, flips, device, torch.float32, cache_dir, model_info.short_hash)
    encode_latents(held_out, family.vae, (False,), device, torch.float32, cache_dir, model_info.short_hash)
    if args.offload_vae:
        family.vae.to("cpu")
    messages = [f"skipped {line}" for line in skipped] + [f"notice: {line}" for line in notices]
    return images, held_out, templates, messages


def _read_images(args, family, folder: Path):
    masks = MaskOptions(Path(args.mask_dir) if args.mask_dir else None, args.unmasked_weight)
    return load_images(folder, args.resolution, family.size_multiple, args.aspect_mode, args.use_alpha_as_loss_weight,
                       family.latent_factor, args.filename_word_regex, args.filename_join_string, masks)


@dataclass
class _Resumed:
    checkpoint: Path | None  # the checkpoint resumed from, if any
    step: int
    start_step: int
    scaler: dict | None = None
    ema: tuple[dict, int] | None = None  # (average, updates)
    batch: ckpt.BatchShape | None = None  # the global batch the checkpoint was trained with


def _resume(args, task: TrainingTask, optimizer, output_dir: Path, file_step: int) -> _Resumed:
    """Load the checkpoint `--resume_from_checkpoint` names into the task and the optimizer;
    without one, the optimizer state saved with a resumed file (if the task read one)."""
    path = ckpt.resolve_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    if path is None:
        if task.optimizer_state:
            optimizer.load_state_dict(task.optimizer_state)
        return _Resumed(None, file_step, file_step)
    state = ckpt.load_checkpoint(path, task.kind, expected=task.state_tensors())
    task.load_state_tensors(state.tensors)
    optimizer.load_state_dict(state.optimizer)
    return _Resumed(path, state.step, state.start_step, state.scaler, state.ema, state.batch)


def _clip_schedule(schedule: ScheduleString | None, start_step: int) -> ScheduleString | None:
    return schedule.resumed_at(start_step) if schedule else None


def _announce(run: TrainingRun, messages: list[str], file_step: int, checkpoint: Path | None) -> None:
    """The settings file, the data notices, what resuming did and one line about the run."""
    args, task, accelerator = run.args, run.task, run.accelerator
    run.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "model_hash": run.model_info.short_hash, "model_name": run.model_info.name,
                "model_architecture": run.model_info.arch, "num_of_dataset_images": len(run.images),
                "initial_step": run.step, "num_processes": accelerator.num_processes,
                "mixed_precision": accelerator.mixed_precision}
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    atomic_write_text(run.output_dir / f"settings-{stamp}.json", json.dumps(settings, indent=1, default=str))
    for line in messages:
        run.logger.notice(line)
    if task.resumed_from is not None:
        print(f"resumed from {task.resumed_from} at step {file_step}")
    if checkpoint is not None:
        print(f"resumed from {checkpoint} at step {run.step}")
    elif args.resume_from_checkpoint:
        print(f"no checkpoint in {run.output_dir}: starting at step {run.step}")
    for line in run.schedule.describe():
        print(line)
    print(f"***** {task.kind}: {len(run.images)} images, {run.plan.steps_per_epoch} steps per epoch, "
          f"batch {run.batch} x {accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation, "
          f"steps {run.step} -> {run.end_step}, {accelerator.mixed_precision} precision on {run.device} *****")


# ------------------------------------------------------------------------------ steps


def _train_steps(run: TrainingRun, hooks: TrainingHooks) -> int:
    """Optimizer steps until the end, a stop request or a NaN that cannot be rolled back; the
    exit code. Any exception first saves the trained file and a checkpoint (`crash`)."""
    stop_request = StopRequest()
    run.take_snapshot()
    run.task.set_training(True)
    try:
        with stop_request:
            while run.step < run.end_step:
                rate = run.schedule.rate_at(run.step)
                if rate is None:
                    break
                loss_sum, prompts = _accumulate(run)
                loss, bad, stop = _mix_across_processes(run.accelerator, run.params, loss_sum,
                                                        not math.isfinite(loss_sum), stop_request.requested)
                if bad:
                    if not _roll_back(run, loss, rate):
                        return EXIT_NAN
                    continue
                grad_norm = _optimizer_step(run, rate)
                final = run.step >= run.end_step or stop
                run.logger.step(run.step, loss, rate * run.lr_multiplier, grad_norm, last=final)
                if hooks.on_step is not None:
                    hooks.on_step(run.step)
                _after_step(run, prompts, final)
                if stop:  # here or on another process: every process exits as if signalled
                    return stop_request.exit_code or EXIT_STOPPED
    except Exception as error:  # noqa: BLE001 - whatever broke the loop, the training is saved first
        run.task.set_training(False)
        save = (lambda: _save_after_crash(run)) if run.is_main else None
        message = save_after_crash(error, run.output_dir, run.step, run.rank, save)
        run.logger.close()
        raise TrainingStopped(message, EXIT_CRASH) from None
    return 0


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
    """The MSE between the UNet's prediction and the family's training target, weighted per
    pixel (masks, alpha) and, with `snr_gamma`, per sample (`objective`)."""
    device, dtype, family = run.device, run.weight_dtype, run.family
    latents, noise, timesteps = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
    with run.accelerator.autocast():
        conditioning = run.task.conditioning(batch.prompts)
        prediction, target = family.prediction_and_target(run.noise_scheduler, latents, noise, timesteps, conditioning,
                                                          batch.sizes, dtype)
    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none") * batch.weights.to(device)[:, None]
    per_sample = sample_weights(run.noise_scheduler, timesteps, snr_gamma)
    if per_sample is not None:
        per_element = per_element * per_sample[:, None, None, None]
    return per_element.mean()


def _mix_across_processes(accelerator, params, loss_sum: float, bad: bool, stop: bool) -> tuple[float, bool, bool]:
    """Average gradients and the loss over processes; any rank's NaN or stop counts for all."""
    world = accelerator.num_processes
    if world == 1:
        return loss_sum, bad, stop
    flags = torch.tensor([loss_sum, float(bad), float(stop)], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(flags)
    average_gradients(params, world)
    return flags[0].item() / world, flags[1].item() > 0, flags[2].item() > 0


def _roll_back(run: TrainingRun, loss: float, rate: float) -> bool:
    """After a non-finite loss: back to the last checkpointed state at half the learning rate;
    False when `--on_nan stop` or too many rollbacks say to give up instead."""
    run.optimizer.zero_grad(set_to_none=True)
    run.rollbacks += 1
    if run.args.on_nan == "stop" or run.rollbacks > MAX_ROLLBACKS:
        if run.is_main:
            fp16 = ", or fp16 overflowed (try --mixed_precision bf16 or no)" if run.weight_dtype == torch.float16 else ""
            gave_up = f"rolled back {MAX_ROLLBACKS} times; " if run.rollbacks > 1 else ""
            run.logger.notice(f"error: loss became {loss} at step {run.step}: the learning rate ({rate}) is likely too "
                              f"high{fp16}; {gave_up}stopped without saving over the last good files")
        return False
    run.restore_snapshot()
    run.lr_multiplier *= 0.5
    run.logger.notice(f"notice: loss became {loss}; rolled back to step {run.step}, "
                      f"learning rate now x{run.lr_multiplier}")
    return True


def _optimizer_step(run: TrainingRun, rate: float) -> float:
    """Unscale, clip, step at the scheduled rate; the gradient norm before clipping."""
    run.accelerator.unscale_gradients()
    max_norm = run.clip_norm.rate_at(run.step) if run.clip_norm else None
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm if max_norm else float("inf")).item()
    if run.clip_value and run.clip_value.rate_at(run.step):
        torch.nn.utils.clip_grad_value_(run.params, run.clip_value.rate_at(run.step))
    for group in run.optimizer.param_groups:
        group["lr"] = rate * run.lr_multiplier
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.task.state_tensors())
    run.step += 1
    return grad_norm


def _after_step(run: TrainingRun, prompts: list[str], final: bool) -> None:
    """Intermediate files, previews and checkpoints that fall on this step."""
    args, step = run.args, run.step
    if args.save_steps and step % args.save_steps == 0 and not final and run.is_main:
        with _saved_weights(run):
            _save_files(run, final=False)
            run.task.describe_saved(step, False, run.logger)
    if run.previews_on and step % args.validation_steps == 0:
        run.previews_on = _preview(run, prompts[0] if prompts else run.task.name)
    if run.validation and (step % args.validation_loss_steps == 0 or final) and run.is_main:
        _log_validation_loss(run)
    if args.checkpointing_steps and (step % args.checkpointing_steps == 0 or final):
        if run.is_main:
            _save_checkpoint(run)
        run.accelerator.wait_for_everyone()
        run.take_snapshot()


# ------------------------------------------------------------------------------ files


def _finish(run: TrainingRun, exit_code: int) -> int:
    """The final files (not after a NaN: the last good files stay), then close the run."""
    run.task.set_training(False)
    if exit_code != EXIT_NAN and run.is_main:
        with _saved_weights(run):
            written = _save_files(run, final=True)
        if exit_code:
            print(f"Training interrupted at step {run.step}; resume with --resume_from_checkpoint latest", file=sys.stderr)
        print(f"Saved step {run.step}: {', '.join(str(path) for path in written)}")
        with _saved_weights(run):
            run.task.describe_saved(run.step, True, run.logger)
    run.logger.close()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return exit_code


def _save_files(run: TrainingRun, final: bool) -> list[Path]:
    """The task's trained file(s) for this step (with the optimizer state when asked to keep it)."""
    optimizer_state = run.optimizer.state_dict() if run.args.save_optimizer_state else None
    return run.task.save_files(run.output_dir, run.step, final=final, optimizer_state=optimizer_state)


def _save_after_crash(run: TrainingRun) -> list[Path]:
    """After a crash: the trained file(s) as `<name>.pt` (marked with the step) and a checkpoint."""
    with _saved_weights(run):
        written = _save_files(run, final=True)
    return [*written, _save_checkpoint(run)]


def _save_checkpoint(run: TrainingRun) -> Path:
    scaler = run.accelerator.scaler
    state = ckpt.CheckpointState(
        step=run.step, start_step=run.start_step, kind=run.task.kind, name=run.task.name,
        tensors=run.task.state_tensors(), optimizer=run.optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler else None, ema=run.ema.state() if run.ema else None,
        batch=run.batch_shape, architecture=run.model_info.arch,
    )
    return ckpt.save_checkpoint(run.output_dir, state, run.args.checkpoints_total_limit, keep=run.resumed_from)


@contextmanager
def _saved_weights(run: TrainingRun) -> Iterator[None]:
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


def _log_validation_loss(run: TrainingRun) -> None:
    """The held-out images' loss at fixed noise and timesteps, of the weights files would hold."""
    run.task.set_training(False)
    try:
        with _saved_weights(run), torch.no_grad():
            losses = [_loss(run, batch, None).item() for batch in run.validation]
    finally:
        run.task.set_training(True)
    loss = sum(losses) / len(losses)
    run.logger.scalars(run.step, {"loss/validation": loss})
    run.logger.table(VALIDATION_CSV, ["step", "validation_loss"], [[run.step, f"{loss:.7f}"]])


def _preview(run: TrainingRun, training_prompt: str) -> bool:
    """Preview images on the main process, with the VAE brought back if it was offloaded.

    Returns whether previews should go on: a preview that raises is reported once and turned
    off, since a picture is never worth the training it would otherwise end."""
    if not run.is_main:
        return True
    args, family = run.args, run.family
    if args.offload_vae:
        family.vae.to(family.unet.device)
    run.task.set_training(False)
    request = PreviewRequest(
        prompt=args.validation_prompt or training_prompt, negative=args.validation_negative_prompt,
        seed=args.validation_seed if args.validation_seed is not None else args.seed + run.step,
        steps=args.validation_num_inference_steps, cfg_scale=args.validation_guidance_scale,
        size=(args.resolution, args.resolution), count=args.num_validation_images,
        output_dir=run.output_dir, step=run.step)
    try:
        started = time.perf_counter()
        with _saved_weights(run):
            pictures = run.task.preview(family, request)
        run.logger.images(run.step, pictures, request.prompt, time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - any failure of a preview, see the docstring
        run.logger.notice(preview_notice(error, run.step))
        return False
    finally:
        run.task.set_training(True)
        if args.offload_vae:
            family.vae.to("cpu")
    return True


def save_previews(pictures: list, output_dir: Path, name: str, step: int) -> None:
    """`images/<name>-<step>.png` (A1111's preview names; `-1`, `-2` for further images)."""
    for index, picture in enumerate(pictures):
        target = output_dir / "images" / f"{name}-{step}{'' if index == 0 else f'-{index}'}.png"
        with atomic_path(target) as tmp:
            picture.save(tmp, format="PNG")


def run_script(parse_args: Callable, task_class: Callable, argv: list[str] | None = None) -> int:
    """What both training scripts do: parse (every flag checked before the model loads), train,
    turn errors into one line on stderr and an exit code."""
    from tinv_lib.common.quiet import silence_known_noise

    silence_known_noise()
    try:
        args = parse_args(argv)
        return train(args, task_class(args))
    except TrainingStopped as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except TinvError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
