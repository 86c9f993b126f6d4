"""A run's set-up: everything `loop.train` needs before step 1, built once into a `TrainingRun`.

In order: accelerate (the entry point cleared its process-wide state: `runner.prepare_process`),
the frozen model, the task's trainables, the images with their latents cached, the batch plan,
the optimizer, resuming (a checkpoint, or the optimizer state saved with a resumed file), the
learning-rate and clipping schedules, the moving average, the held-out validation batches; then
the start of the run is announced (`banner`).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.training import checkpoints as ckpt
from tinv_lib.training.banner import announce
from tinv_lib.training.batches import SampleSettings
from tinv_lib.training.data import (
    BatchPlan,
    MaskOptions,
    build_prompt,
    encode_latents,
    load_images,
    load_template,
)
from tinv_lib.training.datasets_source import DatasetSpec, image_settings, load_dataset_images, open_stream
from tinv_lib.training.early_stopping import FixedBatchHistory
from tinv_lib.training.ema import ExponentialMovingAverage
from tinv_lib.training.frozen_model import load_frozen_model
from tinv_lib.training.logs import RunLogger
from tinv_lib.training.lr_schedule import ScheduleString
from tinv_lib.training.optimizers import build_optimizer
from tinv_lib.training.task import RunProgress, TrainingRun, TrainingTask
from tinv_lib.training.validation import split_off, validation_batches


def set_up(args, task: TrainingTask) -> TrainingRun:
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
    fixed = _fixed_batch_images(args, images, held_out)
    noise_scheduler = family.noise_scheduler()
    images, plan, batch = _batch_plan(args, images, family, device, accelerator)
    params = task.parameters()
    optimizer = build_optimizer(task.parameter_groups(), args)
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
        start_step=resumed.start_step, end_step=min(args.max_train_steps, schedule.end_step),
        progress=RunProgress(step=resumed.step, previews_on=bool(args.validation_steps),
                             fixed_batch=FixedBatchHistory.from_state(resumed.fixed_batch)),
        ema=_moving_average(args, task, resumed), resumed_from=resumed.checkpoint,
        validation=validation_batches(fixed, templates[0], task.name, samples.timesteps[1], family.latent_scale),
    )
    if run.is_main:
        announce(run, messages, file_step, resumed.checkpoint)
        if resumed.batch is not None and resumed.batch.size != run.batch_shape.size:
            print(f"notice: {resumed.checkpoint.name} was trained with a global batch of {resumed.batch.describe()}; "
                  f"this run's is {run.batch_shape.describe()}: from step {run.step} on, the data order differs "
                  "from the uninterrupted run's")
    return run


def _fixed_batch_images(args, images, held_out):
    """The images of the fixed-batch loss: the held-out ones; without them, with
    `--early_stopping` or `--keep_best`, the training images (as DVAR does; `early_stopping`)."""
    if held_out or not (args.early_stopping or args.keep_best):
        return held_out
    return images


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
    """An `Accelerator` that follows this run's flags and environment (the entry point cleared
    accelerate's process-wide state first: `runner.prepare_process`)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision)


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _load_data(args, task: TrainingTask, family, model_info, device):
    """(training images and held-out images, with their latents cached; template lines; messages)."""
    templates = load_template(args.template_file)
    images, skipped, notices = _read_training_images(args, family)
    held_out = []
    if args.validation_data_dir:
        held_out, more_skipped, _ = _read_images(args, family, Path(args.validation_data_dir))
        skipped += more_skipped
    elif args.validation_split:
        images, held_out = split_off(images, args.validation_split, args.seed)
    if images:  # a stream's captions are read step by step
        task.check_prompts([build_prompt(t, im.caption, task.name, random.Random(0), False, 0.0) for im in images for t in templates])
    flips = (False, True) if args.flip_p > 0 else (False,)
    cache_dir = Path(args.latent_cache_dir) if args.latent_cache_dir else None
    encode_latents(images, family.vae, flips, device, torch.float32, cache_dir, model_info.short_hash)
    encode_latents(held_out, family.vae, (False,), device, torch.float32, cache_dir, model_info.short_hash)
    if args.offload_vae:
        family.vae.to("cpu")
    messages = [f"skipped {line}" for line in skipped] + [f"notice: {line}" for line in notices]
    return images, held_out, templates, messages


def _read_training_images(args, family):
    """The training images of --train_data_dir or --dataset_name; with --streaming none are read
    up front (`_batch_plan`)."""
    if not args.dataset_name:
        return _read_images(args, family, Path(args.train_data_dir))
    if args.streaming:
        return [], [], []
    return load_dataset_images(DatasetSpec.from_args(args), image_settings(args, family))


def _batch_plan(args, images, family, device, accelerator):
    """(images, plan, images per process and micro-batch): the loaded images and their batch
    order; with --streaming the stream's plan, whose `window` holds each micro-batch's images."""
    world = accelerator.num_processes
    if args.streaming:
        plan = open_stream(args, family, device, world, accelerator.process_index)
        return plan.window, plan, args.train_batch_size
    batch = min(args.train_batch_size, max(1, len(images) // world))
    return images, BatchPlan([im.size for im in images], batch * world, args.gradient_accumulation_steps, args.seed), batch


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
    fixed_batch: dict | None = None  # the fixed-batch history (`early_stopping.FixedBatchHistory.state`)


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
    _resume_norm_control(task, state.norm_control)
    return _Resumed(path, state.step, state.start_step, state.scaler, state.ema, state.batch, state.fixed_batch)


def _resume_norm_control(task: TrainingTask, saved: dict | None) -> None:
    """`--norm_mode`: the checkpoint's targets; a checkpoint trained without them has its vectors
    moved onto this run's targets now."""
    if task.norm_control is None:
        return
    if saved is not None:
        task.norm_control.load_state(saved)
    else:
        task.norm_control.retract()


def _clip_schedule(schedule: ScheduleString | None, start_step: int) -> ScheduleString | None:
    return schedule.resumed_at(start_step) if schedule else None
