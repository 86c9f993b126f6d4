"""The training loop shared by textual inversion and hypernetworks.

One loop; what differs between the two trainers is a `TrainingTask` (which parameters train,
how prompts become conditioning, what files are written). The loop reads top to bottom:
set up → cache latents → (resume) → for each optimizer step: accumulate micro-batches, reduce
gradients across processes, guard against NaN, clip, step → log, save, preview, checkpoint.

Nothing is lost to a crash: a preview that fails is reported once and previews stop, and any
other exception inside the loop first saves the trained file and a checkpoint (`crash`).

Gradients are averaged across processes by one explicit all-reduce of the (small) trainable
tensors per step, which is also where the NaN and stop flags of every rank are combined, so all
ranks always agree on what happens next.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from tinv_lib.common.atomic import atomic_path, atomic_write_text
from tinv_lib.common.errors import TinvError
from tinv_lib.training import checkpoints as ckpt
from tinv_lib.training.crash import EXIT_CRASH, preview_notice, save_after_crash
from tinv_lib.training.data import (
    BatchPlan,
    MaskOptions,
    build_prompt,
    encode_latents,
    load_images,
    load_template,
    sample_latent,
    seeded,
)
from tinv_lib.training.distributed import average_gradients
from tinv_lib.training.logs import RunLogger
from tinv_lib.training.lr_schedule import ScheduleString, build_schedule
from tinv_lib.training.signals import StopRequest

EXIT_NAN = 3
MAX_ROLLBACKS = 10  # with --on_nan rollback: give up after this many (e.g. NaN in the data itself)


class TrainingStopped(TinvError):
    """Training ended early; `exit_code` tells the script what to return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingTask(Protocol):
    """What a trainer plugs into the loop.

    Optional: `describe_saved(step, final, logger)`, called on the main process after every
    `save_files`, reports on what was saved through the `RunLogger` (textual inversion's embedding
    diagnostics); a task without it reports nothing.
    """

    kind: str  # "textual_inversion" | "hypernetwork" (checkpoint compatibility, file names)
    name: str  # the embedding / hypernetwork name, also `[name]` in templates

    def setup(self, family, model_info, args, device: torch.device) -> int:
        """Create or load the trainable state; return the step count it already has."""

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning (and SDXL pooled embeds), differentiable w.r.t. the trainables."""

    def set_training(self, training: bool) -> None: ...

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise before step 1 if the prompts cannot train anything."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def save_files(self, output_dir: Path, step: int, final: bool, optimizer_state: dict | None) -> list[Path]:
        """Write the trained artifact (intermediate or final); return the paths written."""

    def preview(self, family, prompt: str, negative: str, seed: int, steps: int, cfg_scale: float,
                size: tuple[int, int], output_dir: Path, step: int, count: int) -> list:
        """Render preview images with the current state; return PIL images."""


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _optimizer(params: list[torch.nn.Parameter], args, weight_decay: float):
    options = dict(lr=1.0, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=weight_decay)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **options)
    return torch.optim.AdamW(params, **options)


def _clip_schedule(text: str | None, max_steps: int, start_step: int) -> ScheduleString | None:
    return ScheduleString(text, max_steps, start_step) if text else None


def _mix_across_processes(accelerator, params, loss_sum: float, bad: bool, stop: bool) -> tuple[float, bool, bool]:
    """Average gradients and the loss over processes; any rank's NaN or stop counts for all."""
    world = accelerator.num_processes
    if world == 1:
        return loss_sum, bad, stop
    flags = torch.tensor([loss_sum, float(bad), float(stop)], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(flags)
    average_gradients(params, world)
    return flags[0].item() / world, flags[1].item() > 0, flags[2].item() > 0


def train(args, task: TrainingTask, on_step: Callable[[int], None] | None = None) -> int:
    """Run a whole training job; return the process exit code (0 when finished).

    `on_step(step)` is called after every optimizer step (benchmarks time the steps with it).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from tinv_lib.common.quiet import silence_known_noise
    from tinv_lib.models.family import family_of
    from tinv_lib.models.loading import load_base_model

    silence_known_noise()  # also when train() is called without run_script (benchmarks, notebooks)
    # Accelerate keeps its precision settings in process-wide singletons: clear them so a second
    # run in the same process (tests, notebooks) follows its own flags and environment.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    is_main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = _weight_dtype(accelerator.mixed_precision)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        ckpt.remove_partial_files(output_dir)

    # ---- model: everything frozen; trainables come from the task
    pipe, model_info = load_base_model(args.pretrained_model_name_or_path, args.model_config)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    for module in [family.unet, family.vae, *family.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    for module in [family.unet, *family.text_encoders]:
        module.to(device) if weight_dtype == torch.float32 else module.to(device, weight_dtype)
    family.vae.to(device)
    if args.gradient_checkpointing:
        family.unet.enable_gradient_checkpointing()
        family.unet.train()  # diffusers checkpoints only in training mode; its dropout is 0
        for encoder in family.text_encoders:
            encoder.gradient_checkpointing_enable()
            encoder.train()
    task_step = file_step = task.setup(family, model_info, args, device)

    # ---- data: images, prompts, latents cached once
    templates = load_template(args.template_file)
    masks = MaskOptions(Path(args.mask_dir) if args.mask_dir else None, args.unmasked_weight)
    images, skipped, notices = load_images(
        Path(args.train_data_dir), args.resolution, family.size_multiple, args.aspect_mode,
        args.use_alpha_as_loss_weight, family.latent_factor, args.filename_word_regex, args.filename_join_string, masks,
    )
    task.check_prompts([build_prompt(t, im.caption, task.name, random.Random(0), False, 0.0) for im in images for t in templates])
    flips = (False, True) if args.flip_p > 0 else (False,)
    cache_dir = Path(args.latent_cache_dir) if args.latent_cache_dir else None
    encode_latents(images, family.vae, flips, device, torch.float32, cache_dir, model_info.short_hash)
    if args.offload_vae:
        family.vae.to("cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    batch = min(args.train_batch_size, max(1, len(images) // world))
    plan = BatchPlan([im.size for im in images], batch * world, args.gradient_accumulation_steps, args.seed)

    # ---- optimizer and resume
    params = task.parameters()
    optimizer = _optimizer(params, args, weight_decay=getattr(args, "adam_weight_decay", 0.0))
    start_step = task_step
    resume = ckpt.resolve_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    if resume is not None:
        state = ckpt.load_checkpoint(resume, task.kind)
        task.load_state_tensors(state.tensors)
        optimizer.load_state_dict(state.optimizer)
        task_step, start_step = state.step, state.start_step
    elif getattr(task, "optimizer_state", None):
        optimizer.load_state_dict(task.optimizer_state)
    optimizer = accelerator.prepare(optimizer)
    if resume is not None and state.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state.scaler)
    schedule = build_schedule(args.learning_rate, args.max_train_steps, start_step, args.lr_scheduler, args.lr_warmup_steps)
    clip_norm = _clip_schedule(args.max_grad_norm, args.max_train_steps, start_step)
    clip_value = _clip_schedule(args.clip_grad_value, args.max_train_steps, start_step)
    end_step = min(args.max_train_steps, schedule.end_step)
    noise_scheduler = family.noise_scheduler()

    logger = RunLogger(output_dir, task.kind, args, is_main, plan.steps_per_epoch, resume_step=task_step if resume else None)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings = {**vars(args), "model_hash": model_info.short_hash, "model_name": model_info.name,
                    "model_architecture": model_info.arch, "num_of_dataset_images": len(images),
                    "initial_step": task_step, "num_processes": world, "mixed_precision": accelerator.mixed_precision}
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        atomic_write_text(output_dir / f"settings-{stamp}.json", json.dumps(settings, indent=1, default=str))
        for line in skipped:
            logger.notice(f"skipped {line}")
        for line in notices:
            logger.notice(f"notice: {line}")
        _report_resume(args, task, output_dir, file_step, resume, task_step)
        for line in schedule.describe():
            print(line)
        print(f"***** {task.kind}: {len(images)} images, {plan.steps_per_epoch} steps per epoch, "
              f"batch {batch} x {world} processes x {args.gradient_accumulation_steps} accumulation, "
              f"steps {task_step} -> {end_step}, {accelerator.mixed_precision} precision on {device} *****")

    # ---- the loop
    stop_request = StopRequest()
    snapshot = (task_step, {k: v.clone() for k, v in task.state_tensors().items()}, copy.deepcopy(optimizer.state_dict()))
    lr_multiplier, rollbacks = 1.0, 0
    step = task_step
    exit_code = 0
    previews_on = bool(args.validation_steps)
    task.set_training(True)
    try:
        with stop_request:
            while step < end_step:
                rate = schedule.rate_at(step)
                if rate is None:
                    break
                loss_sum, last_prompts = 0.0, []
                for micro in range(args.gradient_accumulation_steps):
                    k = step * args.gradient_accumulation_steps + micro
                    torch.manual_seed(seeded(args.seed, 7, k, rank))  # dropout et al.: a function of the step too
                    epoch, members = plan.batch(k)
                    mine = list(enumerate(members))[rank * batch:(rank + 1) * batch]
                    latents, noises, timesteps, prompts, weights = [], [], [], [], []
                    for position, index in mine:
                        image = images[index]
                        text_rng = random.Random(seeded(args.seed, 3, k, position))
                        prompts.append(build_prompt(text_rng.choice(templates), image.caption, task.name, text_rng,
                                                    args.shuffle_tags, args.tag_dropout))
                        flip = random.Random(seeded(args.seed, 6, k, position)).random() < args.flip_p
                        mean, std = image.latents[flip]
                        once = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seeded(args.seed, 5, index, int(flip))))
                        fresh = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seeded(args.seed, 4, k, position)))
                        latents.append(sample_latent(mean, std, args.latent_sampling, once, fresh) * family.latent_scale)
                        generator = torch.Generator().manual_seed(seeded(args.seed, 2, k, position))
                        noises.append(torch.randn(mean.shape, generator=generator))
                        timesteps.append(torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator))
                        weight = image.weight.flip(-1) if (image.weight is not None and flip) else image.weight
                        weights.append(weight if weight is not None else torch.ones(mean.shape[1:]))
                    latents_t = torch.stack(latents).to(device)
                    noise_t = torch.stack(noises).to(device)
                    t = torch.cat(timesteps).to(device)
                    noisy = noise_scheduler.add_noise(latents_t, noise_t, t)
                    with accelerator.autocast():
                        hidden, pooled = task.conditioning(prompts)
                        extra = family.unet_extra(pooled, [images[i].size for _, i in mine], device, weight_dtype)
                        prediction = family.unet(noisy.to(weight_dtype), t, hidden.to(weight_dtype), **extra).sample
                    target = family.training_target(noise_scheduler, latents_t, noise_t, t)
                    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none")
                    loss = (per_element * torch.stack(weights).to(device)[:, None]).mean()
                    accelerator.backward(loss / args.gradient_accumulation_steps)
                    loss_sum += loss.item() / args.gradient_accumulation_steps
                    last_prompts = prompts

                bad = not math.isfinite(loss_sum)
                loss_value, bad, stop = _mix_across_processes(accelerator, params, loss_sum, bad, stop_request.requested)
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    rollbacks += 1
                    if args.on_nan == "stop" or rollbacks > MAX_ROLLBACKS:
                        exit_code = EXIT_NAN
                        message = (f"loss became {loss_value} at step {step}: the learning rate ({rate}) is likely too high"
                                   f"{', or fp16 overflowed (try --mixed_precision bf16 or no)' if weight_dtype == torch.float16 else ''}; "
                                   f"{'rolled back ' + str(MAX_ROLLBACKS) + ' times; ' if rollbacks > 1 else ''}"
                                   "stopped without saving over the last good files")
                        if is_main:
                            print(f"error: {message}", file=sys.stderr)
                        break
                    step, tensors, optimizer_state = snapshot
                    task.load_state_tensors(tensors)
                    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
                    lr_multiplier *= 0.5
                    logger.notice(f"notice: loss became {loss_value}; rolled back to step {step}, "
                                  f"learning rate now x{lr_multiplier}")
                    continue

                accelerator.unscale_gradients()
                max_norm = clip_norm.rate_at(step) if clip_norm else None
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf")).item()
                if clip_value and clip_value.rate_at(step):
                    torch.nn.utils.clip_grad_value_(params, clip_value.rate_at(step))
                for group in optimizer.param_groups:
                    group["lr"] = rate * lr_multiplier
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                final_step = step >= end_step or stop
                logger.step(step, loss_value, rate * lr_multiplier, grad_norm, last=final_step)
                if on_step is not None:
                    on_step(step)

                if args.save_steps and step % args.save_steps == 0 and not final_step and is_main:
                    task.save_files(output_dir, step, final=False, optimizer_state=_optim_state(args, optimizer))
                    _describe_saved(task, step, False, logger)
                if previews_on and step % args.validation_steps == 0:
                    previews_on = _preview(args, task, family, last_prompts[0] if last_prompts else task.name, step,
                                           output_dir, logger, is_main)
                if args.checkpointing_steps and (step % args.checkpointing_steps == 0 or final_step):
                    if is_main:
                        _save_checkpoint(output_dir, task, optimizer, accelerator, step, start_step, args)
                    accelerator.wait_for_everyone()
                    snapshot = (step, {k: v.clone() for k, v in task.state_tensors().items()}, copy.deepcopy(optimizer.state_dict()))
                if stop:
                    exit_code = stop_request.exit_code
                    break
    except Exception as error:  # noqa: BLE001 - whatever broke the loop, the training is saved first
        task.set_training(False)
        save = (lambda: _save_everything(output_dir, task, optimizer, accelerator, step, start_step, args)) if is_main else None
        message = save_after_crash(error, output_dir, step, accelerator.process_index, save)
        logger.close()
        raise TrainingStopped(message, EXIT_CRASH) from None

    task.set_training(False)
    if exit_code != EXIT_NAN and is_main:
        written = task.save_files(output_dir, step, final=True, optimizer_state=_optim_state(args, optimizer))
        if exit_code:
            print(f"Training interrupted at step {step}; resume with --resume_from_checkpoint latest", file=sys.stderr)
        print(f"Saved step {step}: {', '.join(str(path) for path in written)}")
        _describe_saved(task, step, True, logger)
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def _optim_state(args, optimizer) -> dict | None:
    return optimizer.state_dict() if args.save_optimizer_state else None


def _describe_saved(task, step: int, final: bool, logger: RunLogger) -> None:
    """Let the task report on the file it just saved, if it has anything to say."""
    describe = getattr(task, "describe_saved", None)
    if describe is not None:
        describe(step, final, logger)


def _report_resume(args, task, output_dir: Path, file_step: int, checkpoint: Path | None, step: int) -> None:
    """Say what resuming did: from which file or checkpoint, at which step, or that there was none."""
    source = getattr(task, "resumed_from", None)
    if source is not None:
        print(f"resumed from {source} at step {file_step}")
    if checkpoint is not None:
        print(f"resumed from {checkpoint} at step {step}")
    elif args.resume_from_checkpoint:
        print(f"no checkpoint in {output_dir}: starting at step {step}")


def _save_everything(output_dir: Path, task, optimizer, accelerator, step: int, start_step: int, args) -> list[Path]:
    """After a crash: the trained file(s) as `<name>.pt` (marked with `step`) and a checkpoint."""
    written = task.save_files(output_dir, step, final=True, optimizer_state=_optim_state(args, optimizer))
    return [*written, _save_checkpoint(output_dir, task, optimizer, accelerator, step, start_step, args)]


def _save_checkpoint(output_dir: Path, task, optimizer, accelerator, step: int, start_step: int, args) -> Path:
    state = ckpt.CheckpointState(
        step=step, start_step=start_step, kind=task.kind, name=task.name, tensors=task.state_tensors(),
        optimizer=optimizer.state_dict(), scaler=accelerator.scaler.state_dict() if accelerator.scaler else None,
    )
    return ckpt.save_checkpoint(output_dir, state, args.checkpoints_total_limit)


def _preview(args, task, family, training_prompt: str, step: int, output_dir: Path, logger, is_main: bool) -> bool:
    """Preview images on the main process, with the VAE brought back if it was offloaded.

    Returns whether previews should go on: a preview that raises is reported once and turned
    off, since a picture is never worth the training it would otherwise end."""
    if not is_main:
        return True
    device = family.unet.device
    if args.offload_vae:
        family.vae.to(device)
    task.set_training(False)
    try:
        seed = args.validation_seed if args.validation_seed is not None else args.seed + step
        size = (args.resolution, args.resolution)
        prompt = args.validation_prompt or training_prompt
        started = time.perf_counter()
        pictures = task.preview(family, prompt, args.validation_negative_prompt, seed,
                                args.validation_num_inference_steps, args.validation_guidance_scale, size,
                                output_dir, step, args.num_validation_images)
        logger.images(step, pictures, prompt, time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - any failure of a preview, see the docstring
        logger.notice(preview_notice(error, step))
        return False
    finally:
        task.set_training(True)
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
