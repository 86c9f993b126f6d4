"""Command-line arguments shared by both trainers, and how a trainer's command line is parsed.

Flag names follow the diffusers examples where one exists. A config file (`--config`,
`tinv_lib.common.config_file`) may set any flag; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tinv_lib.common.cli_help import HelpFormatter, mark_required
from tinv_lib.common.config_file import add_config_argument, parse_with_config
from tinv_lib.training.data import BUILTIN_TEMPLATES
from tinv_lib.training.early_stopping import DVAR_THRESHOLD, DVAR_WINDOW_STEPS
from tinv_lib.training.lr_schedule import ScheduleError, ScheduleString, build_schedule
from tinv_lib.training.optimizers import OPTIMIZERS
from tinv_lib.training.preflight import ArgumentError, check_training_arguments

__all__ = ["ArgumentError", "HelpFormatter", "add_model_arguments", "add_training_arguments", "mark_required",
           "parse_training_args"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", help="diffusers folder, single .safetensors/.ckpt, or hub id (online only)")
    group.add_argument("--model_config", help="config folder for a single-file checkpoint (any diffusers folder of the same architecture)")


def add_training_arguments(parser: argparse.ArgumentParser, default_lr: str, default_template: str,
                           default_weight_decay: float) -> None:
    """Data, loss, optimisation, outputs and resume: every flag both trainers share."""
    _add_data_arguments(parser, default_template)
    _add_loss_arguments(parser)
    _add_optimizer_arguments(parser, default_lr, default_weight_decay)
    _add_output_arguments(parser)
    _add_stopping_arguments(parser)
    add_config_argument(parser)


def _add_data_arguments(parser: argparse.ArgumentParser, default_template: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", help="folder of training images (.txt caption sidecars optional); this or --dataset_name is required")
    data.add_argument("--dataset_name",
                      help="train from a Hugging Face dataset instead: a hub id (read from the cache when offline), a "
                           "save_to_disk folder, a folder or glob of parquet/arrow/jsonl/webdataset .tar files, or an "
                           "image folder with metadata.jsonl")
    data.add_argument("--dataset_config_name", help="the dataset's configuration (hub datasets that have several)")
    data.add_argument("--dataset_split", default="train", help="the split to train on")
    data.add_argument("--image_column", default="image", help="the dataset column holding the images")
    data.add_argument("--caption_column", default="text",
                      help="the dataset column holding the captions ([filewords]; '' for none)")
    data.add_argument("--mask_column", help="the dataset column holding loss masks (white = the concept, black = not)")
    data.add_argument("--cache_dir", help="where datasets keeps hub downloads and prepared data (default: its own cache)")
    data.add_argument("--streaming", action="store_true",
                      help="read --dataset_name step by step instead of loading it: for sets larger than the disk or RAM")
    data.add_argument("--template_file", default=default_template,
                      help=f"prompt template: a file path or one of {', '.join(BUILTIN_TEMPLATES)}")
    data.add_argument("--filename_word_regex", default="", help="regex whose matches in a file name form its caption (A1111)")
    data.add_argument("--filename_join_string", default=" ", help="joins the --filename_word_regex matches")
    data.add_argument("--shuffle_tags", action="store_true", help="shuffle the caption's comma-separated tags")
    data.add_argument("--tag_dropout", type=float, default=0.0, help="drop each caption tag with this probability")
    data.add_argument("--caption_dropout", type=float, default=0.0,
                      help="leave the whole caption ([filewords]) out with this probability; [name] stays (kohya)")
    data.add_argument("--resolution", type=int, default=512, help="training size (side of a square; area for buckets)")
    data.add_argument("--aspect_mode", choices=["buckets", "crop", "stretch"], default="buckets",
                      help="non-square images: aspect buckets, centre crop to a square, or stretch (A1111)")
    data.add_argument("--flip_p", type=float, default=0.0, help="probability of a horizontal flip per sample")
    data.add_argument("--use_alpha_as_loss_weight", action="store_true", help="PNG alpha channel weights the loss (A1111)")
    data.add_argument("--mask_dir", help="folder of loss masks <stem>-masklabel.png (default: beside the images); "
                      "white = the concept, black = not")
    data.add_argument("--unmasked_weight", type=float, default=None,
                      help="loss weight outside the masks, in [0, 1] (default: 0; given, the alpha channel is a mask too)")
    data.add_argument("--latent_sampling", choices=["once", "deterministic", "random"], default="once",
                      help="VAE posterior: one fixed sample, its mean, or a fresh sample every step")
    data.add_argument("--latent_cache_dir", help="also keep the latent cache on disk here (reused across runs)")
    data.add_argument("--offload_vae", action="store_true", help="keep the VAE on the CPU after caching; move it back only for previews")
    data.add_argument("--validation_split", type=float, default=0.0,
                      help="hold this share of the images out of training for the validation loss")
    data.add_argument("--validation_data_dir", help="held-out images for the validation loss (instead of --validation_split)")
    data.add_argument("--validation_loss_steps", type=int, default=100,
                      help="validation loss every N steps, when there are held-out images")


def _add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    loss = parser.add_argument_group("loss and noise")
    loss.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-γ loss weighting (e.g. 5; default: off)")
    loss.add_argument("--noise_offset", type=float, default=0.0, help="add this times a random constant per channel to the noise")
    loss.add_argument("--min_timestep", type=int, default=0, help="train on timesteps from this one (kohya)")
    loss.add_argument("--max_timestep", type=int, default=None,
                      help="train on timesteps below this one (default: the scheduler's number of timesteps)")


def _add_optimizer_arguments(parser: argparse.ArgumentParser, default_lr: str, default_weight_decay: float) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", default=default_lr, help='a float or an A1111 schedule "0.005:100, 1e-3:1000, 1e-5"')
    optim.add_argument("--lr_scheduler", default="constant", help="diffusers scheduler for a plain-float rate (constant, linear, cosine, ...)")
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="steps of linear warm-up for --lr_scheduler")
    optim.add_argument("--train_batch_size", type=int, default=1, help="images per batch per process")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches summed into each optimizer step")
    optim.add_argument("--max_train_steps", type=int, default=3000, help="optimizer steps (never exceeded, also when resuming)")
    optim.add_argument("--max_grad_norm", help="clip the gradient norm (a float or schedule string), after unscaling")
    optim.add_argument("--clip_grad_value", help="clip gradient values (a float or schedule string), after unscaling")
    optim.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                       help="adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt: use --learning_rate 1), "
                            "adafactor (transformers), schedulefree_adamw (schedulefree)")
    optim.add_argument("--optimizer_args", nargs="*", default=None, metavar="KEY=VALUE",
                       help='further constructor arguments, e.g. "d_coef=2" "safeguard_warmup=True"')
    optim.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer adamw8bit")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="beta1 (AdamW, 8-bit AdamW, Prodigy, schedule-free)")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="beta2 (AdamW, 8-bit AdamW, Prodigy, schedule-free)")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="epsilon (AdamW, 8-bit AdamW, Prodigy, schedule-free)")
    optim.add_argument("--adam_weight_decay", type=float, default=default_weight_decay,
                       help=f"weight decay (default: {default_weight_decay}, as A1111)")
    optim.add_argument("--ema_decay", type=float, default=None,
                       help="keep an exponential moving average of the trainables (e.g. 0.999; warm-up included)")
    optim.add_argument("--save_ema", action="store_true", help="saved files and previews hold the moving average")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="default: what `accelerate launch` / the accelerate config says")
    optim.add_argument("--seed", type=int, default=0, help="seeds data order, noise, timesteps and previews")
    optim.add_argument("--on_nan", choices=["stop", "rollback"], default="stop",
                       help="non-finite loss: stop, or roll back to the last good state with half the learning rate")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("outputs and resume")
    out.add_argument("--output_dir", default="output", help="where every output of the run goes")
    out.add_argument("--save_steps", type=int, default=500, help="intermediate file every N steps (0: off)")
    out.add_argument("--save_optimizer_state", action="store_true", help="write A1111 .optim sidecars next to saved files")
    out.add_argument("--validation_steps", type=int, default=500, help="preview images every N steps (0: off)")
    out.add_argument("--validation_prompt", help="preview prompt (default: the first training prompt of the batch)")
    out.add_argument("--validation_negative_prompt", default="", help="preview negative prompt")
    out.add_argument("--validation_seed", type=int, default=None, help="fixed preview seed (default: the run seed plus the step)")
    out.add_argument("--num_validation_images", type=int, default=1, help="preview images per preview")
    out.add_argument("--validation_num_inference_steps", type=int, default=20, help="sampling steps per preview")
    out.add_argument("--validation_guidance_scale", type=float, default=7.0,
                     help="preview CFG scale (default: 7.0, as A1111; small models such as models/toy want about 4)")
    out.add_argument("--log_csv_steps", type=int, default=10, help="a loss CSV row every N steps")
    out.add_argument("--report_to", choices=["tensorboard", "wandb", "all", "none"], default="tensorboard",
                     help="log loss, learning rate and previews to TensorBoard (in <output_dir>/logs), Weights & "
                          "Biases (needs `pip install wandb`; WANDB_MODE=offline keeps it local), or all of them")
    out.add_argument("--tracker_project_name", default=None,
                     help="wandb project (default: $WANDB_PROJECT, else tinv); the run is named after the output folder")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="resumable checkpoint every N steps (0: off)")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints (default: all)")
    out.add_argument("--resume_from_checkpoint", help='"latest" (the newest in --output_dir, if any) or a checkpoint folder')
    out.add_argument("--accept_new_global_batch", action="store_true",
                     help="resume a checkpoint trained with another global batch (the data order changes from there)")


def _add_stopping_arguments(parser: argparse.ArgumentParser) -> None:
    stop = parser.add_argument_group("early stopping and the best step (the fixed-batch loss: held-out images, "
                                     "else the training images, every --validation_loss_steps)")
    stop.add_argument("--early_stopping", choices=["dvar"], default=None,
                      help="dvar: stop once the fixed-batch loss has settled (DVAR, arXiv 2302.04841); not yet "
                           "measured, see docs/training.md")
    stop.add_argument("--early_stopping_window", type=int, default=None,
                      help=f"with --early_stopping: the last N steps whose losses' variance is compared with all "
                           f"losses' (default {DVAR_WINDOW_STEPS}; at least 2 evaluations)")
    stop.add_argument("--early_stopping_threshold", type=float, default=None,
                      help=f"with --early_stopping: stop when that variance ratio falls below this (default "
                           f"{DVAR_THRESHOLD})")
    stop.add_argument("--keep_best", action="store_true",
                      help="also write the file of the step with the lowest fixed-batch loss as <name>-best")


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None, required: list[str],
                        check_task: Callable[[argparse.Namespace], None] | None = None) -> argparse.Namespace:
    """Parse a trainer's command line (and `--config`), normalise it, then run every check that
    needs no model: the shared ones (`tinv_lib.training.preflight`), then the trainer's own."""

    def finish(args: argparse.Namespace) -> None:
        normalise_training_arguments(args)
        check_training_arguments(args)
        parse_schedules(args)
        if check_task is not None:
            check_task(args)

    return parse_with_config(parser, argv, required, finish)


def normalise_training_arguments(args: argparse.Namespace) -> None:
    """One value per meaning, so checks and training read a single flag: `--use_8bit_adam` is
    `--optimizer adamw8bit`."""
    if args.use_8bit_adam:
        if args.optimizer not in ("adamw", "adamw8bit"):
            raise ArgumentError(f"--use_8bit_adam means --optimizer adamw8bit; it cannot go with --optimizer {args.optimizer}")
        args.optimizer = "adamw8bit"


def parse_schedules(args: argparse.Namespace) -> None:
    """`--learning_rate`, `--max_grad_norm` and `--clip_grad_value` become schedules, parsed here
    once (`str()` of each gives the text back); the loop asks them for its start step."""
    try:
        args.learning_rate = build_schedule(args.learning_rate, args.max_train_steps, 0, args.lr_scheduler,
                                            args.lr_warmup_steps)
    except ScheduleError as error:  # said as the flag it is about, as every check does
        text = str(error)
        raise ArgumentError(text if text.startswith("--") else f"--learning_rate {args.learning_rate!r}: {text}") from None
    for name in ("max_grad_norm", "clip_grad_value"):
        value = getattr(args, name)
        try:
            setattr(args, name, ScheduleString(value, args.max_train_steps) if value else None)
        except ScheduleError as error:
            raise ArgumentError(f"--{name} {value!r}: {error}") from None
