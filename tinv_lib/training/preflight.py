"""Checks of the command line that need no model weights, run before the model loads.

A wrong flag must cost a second and one line, not minutes of loading followed by a crash at
the first preview or checkpoint (`--resolution 63` used to train until diffusers refused to
draw the preview). Everything that can be known from the flags, the files they name and the
model's small JSON configs is checked here; the error is an `ArgumentError` (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from tinv_lib.common.errors import ArgumentError
from tinv_lib.models.architecture import vae_factor_of_folders

__all__ = ["ArgumentError", "check_training_arguments", "require_file", "require_folder"]

PIPELINE_MULTIPLE = 8  # diffusers' SD and SDXL pipelines refuse image sides that are not multiples of 8
POSITIVE = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution",
            "num_validation_images", "validation_num_inference_steps", "validation_loss_steps")
ZERO_OR_POSITIVE = ("save_steps", "validation_steps", "checkpointing_steps", "log_csv_steps", "lr_warmup_steps",
                    "min_timestep")


def check_training_arguments(args: argparse.Namespace) -> None:
    """Every check of the flags both trainers share; raise `ArgumentError` on the first failure."""
    _check_counts(args)
    _check_probabilities(args)
    _check_loss_options(args)
    _check_optimizer(args)
    _check_paths(args)
    _check_resolution(args)
    _check_trackers(args)
    _check_early_stopping(args)
    _check_data_source(args)


def _check_early_stopping(args: argparse.Namespace) -> None:
    """`--early_stopping` and `--keep_best` read the fixed-batch loss (`training/early_stopping.py`):
    its window must hold two evaluations, and a stream has no images to fix without held-out ones."""
    from tinv_lib.training.early_stopping import dvar_settings

    for name in ("early_stopping_window", "early_stopping_threshold"):
        if getattr(args, name) is not None and not args.early_stopping:
            raise ArgumentError(f"--{name} has no effect without --early_stopping dvar")
    if args.early_stopping:
        window, evaluations, threshold = dvar_settings(args)
        if evaluations < 2:
            raise ArgumentError(f"--early_stopping_window {window} holds fewer than 2 fixed-batch losses at "
                                f"--validation_loss_steps {args.validation_loss_steps}: make it at least "
                                f"{2 * args.validation_loss_steps}, or evaluate more often")
        if not 0.0 < threshold < 1.0:
            raise ArgumentError(f"--early_stopping_threshold must be in (0, 1), not {threshold}")
    wanted = "--early_stopping" if args.early_stopping else "--keep_best" if args.keep_best else None
    if wanted and args.streaming and not args.validation_data_dir:
        raise ArgumentError(f"{wanted} with --streaming needs --validation_data_dir: a stream holds no fixed "
                            "images to evaluate")


def _check_data_source(args: argparse.Namespace) -> None:
    """A folder or a dataset (last: opening a dataset can take a while the first time)."""
    from tinv_lib.training.datasets_source import check_data_source

    check_data_source(args)


def require_file(flag: str, value: str | None) -> None:
    """A flag that names an existing file (when given)."""
    if value and not Path(value).is_file():
        raise ArgumentError(f"--{flag} {value}: no such file")


def require_folder(flag: str, value: str | None) -> None:
    """A flag that names an existing folder (when given)."""
    if value and not Path(value).is_dir():
        raise ArgumentError(f"--{flag} {value}: no such folder")


def _check_counts(args: argparse.Namespace) -> None:
    for name in POSITIVE:
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name} must be a positive integer, not {getattr(args, name)}")
    for name in ZERO_OR_POSITIVE:
        if getattr(args, name) < 0:
            raise ArgumentError(f"--{name} must be 0 (off) or a positive integer, not {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ArgumentError(f"--checkpoints_total_limit must be a positive integer, not {args.checkpoints_total_limit}")


def _check_probabilities(args: argparse.Namespace) -> None:
    if not 0.0 <= args.tag_dropout < 1.0:
        raise ArgumentError(f"--tag_dropout must be in [0, 1), not {args.tag_dropout}")
    if not 0.0 <= args.flip_p <= 1.0:
        raise ArgumentError(f"--flip_p must be in [0, 1], not {args.flip_p}")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ArgumentError(f"--caption_dropout must be in [0, 1], not {args.caption_dropout}")
    if not 0.0 <= args.validation_split < 1.0:
        raise ArgumentError(f"--validation_split must be in [0, 1), not {args.validation_split}")
    if args.validation_split and args.validation_data_dir:
        raise ArgumentError("--validation_split and --validation_data_dir both name held-out images: give one")
    if args.unmasked_weight is not None and not 0.0 <= args.unmasked_weight <= 1.0:
        raise ArgumentError(f"--unmasked_weight must be in [0, 1], not {args.unmasked_weight}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ArgumentError(f"--{name} must be in [0, 1), not {getattr(args, name)}")


def _check_loss_options(args: argparse.Namespace) -> None:
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise ArgumentError(f"--snr_gamma must be positive, not {args.snr_gamma}")
    if not args.noise_offset >= 0:
        raise ArgumentError(f"--noise_offset must be 0 (off) or positive, not {args.noise_offset}")
    if args.max_timestep is not None and args.max_timestep <= args.min_timestep:
        raise ArgumentError(f"--max_timestep ({args.max_timestep}) must be above --min_timestep ({args.min_timestep})")


def _check_optimizer(args: argparse.Namespace) -> None:
    """The optimizer's package and arguments exist (`--use_8bit_adam` has become `--optimizer
    adamw8bit` while parsing); the moving average has a decay to average with."""
    from tinv_lib.training.optimizers import OptimizerError, check_optimizer

    try:
        check_optimizer(args)
    except OptimizerError as error:
        raise ArgumentError(str(error)) from None
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        raise ArgumentError(f"--ema_decay must be in (0, 1), not {args.ema_decay}")
    if args.save_ema and args.ema_decay is None:
        raise ArgumentError("--save_ema needs --ema_decay (the moving average to save)")


def _check_paths(args: argparse.Namespace) -> None:
    """Files and folders that must exist; the same rules the loaders apply later."""
    from tinv_lib.training.checkpoints import resolve_checkpoint
    from tinv_lib.training.data import load_template

    require_folder("train_data_dir", args.train_data_dir)
    require_folder("mask_dir", args.mask_dir)
    require_folder("validation_data_dir", args.validation_data_dir)
    load_template(args.template_file)
    _check_output_dir(args.output_dir)
    model = args.pretrained_model_name_or_path
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/"))
    if not Path(model).exists() and not looks_like_hub_id:
        raise ArgumentError(f"--pretrained_model_name_or_path {model}: no such model folder or file")
    require_folder("model_config", args.model_config)
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
        _check_resume_batch(args, checkpoint)
        _check_resume_model(args, checkpoint)


def _check_output_dir(output_dir: str) -> None:
    """The output folder is a folder, or can be made one: no file stands at its place or above it."""
    for place in (Path(output_dir), *Path(output_dir).parents):
        if place.exists() and not place.is_dir():
            raise ArgumentError(f"--output_dir {output_dir}: {place} is a file, not a folder; name a folder "
                                "(it is made if missing)")
        if place.exists():
            return


def _check_resume_model(args: argparse.Namespace, checkpoint: Path | None) -> None:
    """A checkpoint resumes only on the architecture it was trained on (it records it; a
    checkpoint from before that, or a model whose configs cannot be read here, is checked
    against the trained tensors' shapes once the model has loaded)."""
    from tinv_lib.models.architecture import ModelLoadError, of_folder
    from tinv_lib.training.checkpoints import read_state

    trained_on = read_state(checkpoint).get("architecture") if checkpoint is not None else None
    folder = next((Path(f) for f in (args.pretrained_model_name_or_path, args.model_config) if f and Path(f).is_dir()),
                  None)
    if trained_on is None or folder is None:
        return
    try:
        architecture = of_folder(folder)
    except ModelLoadError:
        return  # the loader reports a broken model folder in its own words
    if architecture.name != trained_on:
        raise ArgumentError(f"--resume_from_checkpoint: {checkpoint.name} was trained on an {trained_on.upper()} model; "
                            f"{args.pretrained_model_name_or_path} is {architecture.label}: resume with the model it "
                            "was trained on, or start a new --output_dir")


def _check_resume_batch(args: argparse.Namespace, checkpoint: Path | None) -> None:
    """Resuming exactly needs the checkpoint's global batch; any number of processes may make it.

    The number of processes is the launcher's (`WORLD_SIZE`, set by `accelerate launch` and
    `torchrun`). A different global batch changes the data order from the resume step on, so it
    is refused unless `--accept_new_global_batch` says that is what the user wants."""
    from tinv_lib.training.checkpoints import BatchShape, read_batch_shape

    old = read_batch_shape(checkpoint) if checkpoint is not None else None
    new = BatchShape(args.train_batch_size, int(os.environ.get("WORLD_SIZE", "1")), args.gradient_accumulation_steps)
    if old is None or old.size == new.size or args.accept_new_global_batch:
        return
    raise ArgumentError(f"--resume_from_checkpoint: {checkpoint.name} was trained with a global batch of {old.describe()}, "
                        f"this run's is {new.describe()}; keep {old.size} (e.g. --train_batch_size or "
                        "--gradient_accumulation_steps for this number of processes) or pass --accept_new_global_batch")


def _check_resolution(args: argparse.Namespace) -> None:
    factor = vae_factor_of_folders((args.model_config, args.pretrained_model_name_or_path))
    multiple = math.lcm(PIPELINE_MULTIPLE, factor)
    if args.resolution % multiple:
        nearest = max(multiple, round(args.resolution / multiple) * multiple)
        raise ArgumentError(f"--resolution {args.resolution} must be a multiple of {multiple} (the model's VAE and "
                            f"the preview pipeline need it): try {nearest}")


def _check_trackers(args: argparse.Namespace) -> None:
    """wandb is an optional install: say so now, not after the model has loaded."""
    report_to = getattr(args, "report_to", "none")
    if report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ArgumentError(f"--report_to {report_to} needs the wandb package: pip install wandb") from None
