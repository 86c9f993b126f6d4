"""The optimizer of the trainable parameters: the ones kohya and OneTrainer users know.

`--optimizer` picks one of `OPTIMIZERS`; the shared flags (`--adam_beta1/2`, `--adam_epsilon`,
`--adam_weight_decay`) fill the arguments they share, and `--optimizer_args key=value ...`
(kohya's flag) passes any other constructor argument, checked against the constructor before
the model loads. The learning rate is set on the parameter groups before every step by the loop
(A1111 schedule strings), so the optimizer is built with a placeholder rate of 1.0.

Schedule-free AdamW (Defazio et al. 2024) trains one sequence of weights and evaluates another:
it has to be switched to `eval()` for previews and saved files and back to `train()` for steps
(`evaluation_mode`). Checkpoints hold the training sequence and the optimizer state, so resuming
is exact for every optimizer here.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tinv_lib.common.errors import TinvError


class OptimizerError(TinvError):
    """`--optimizer` / `--optimizer_args` cannot be used."""


@dataclass(frozen=True)
class OptimizerKind:
    """One `--optimizer` choice."""

    module: str  # where the class lives
    class_name: str  # also the `optimizer_name` of A1111 `.optim` sidecars
    package: str  # what to `pip install` when the module is missing
    adam_flags: bool  # takes betas / eps from the shared `--adam_*` flags
    defaults: tuple[tuple[str, object], ...] = ()  # our defaults, overridden by --optimizer_args


OPTIMIZERS = {
    "adamw": OptimizerKind("torch.optim", "AdamW", "torch", adam_flags=True),
    "adamw8bit": OptimizerKind("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", adam_flags=True),
    "prodigy": OptimizerKind("prodigyopt", "Prodigy", "prodigyopt", adam_flags=True),
    # A fixed learning rate (ours), not Adafactor's own relative step: kohya's recommended settings.
    "adafactor": OptimizerKind("transformers.optimization", "Adafactor", "transformers", adam_flags=False,
                               defaults=(("scale_parameter", False), ("relative_step", False), ("warmup_init", False))),
    "schedulefree_adamw": OptimizerKind("schedulefree", "AdamWScheduleFree", "schedulefree", adam_flags=True),
}


def optimizer_class(name: str) -> type:
    """The class of `--optimizer name`, or one line saying what to install."""
    import importlib

    kind = OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(kind.module), kind.class_name)
    except ImportError:
        raise OptimizerError(f"--optimizer {name} needs the {kind.package} package: pip install {kind.package}") from None


def parse_optimizer_args(items: list[str] | None) -> dict:
    """`["d_coef=2", "decouple=True"]` → `{"d_coef": 2, "decouple": True}` (Python literals, else strings)."""
    options = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise OptimizerError(f"--optimizer_args {item}: expected key=value")
        try:
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = text.strip()
    return options


def optimizer_options(args) -> dict:
    """Constructor arguments besides the parameters, from the flags and `--optimizer_args`."""
    kind = OPTIMIZERS[args.optimizer]
    options: dict = {"lr": 1.0, "weight_decay": args.adam_weight_decay, **dict(kind.defaults)}
    if kind.adam_flags:
        options.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return {**options, **parse_optimizer_args(args.optimizer_args)}


def check_optimizer(args) -> None:
    """Before the model loads: the package is installed and every option is the constructor's."""
    accepted = inspect.signature(optimizer_class(args.optimizer).__init__).parameters
    unknown = sorted(set(optimizer_options(args)) - set(accepted))
    if unknown:
        raise OptimizerError(f"--optimizer_args: {args.optimizer} has no argument {', '.join(unknown)}")


def build_optimizer(params: list, args):
    optimizer = optimizer_class(args.optimizer)(params, **optimizer_options(args))
    if hasattr(optimizer, "train"):  # schedule-free: steps are taken in training mode
        optimizer.train()
    return optimizer


def sidecar_name(name: str) -> str:
    """The `optimizer_name` A1111 writes in `.optim` sidecars for this optimizer."""
    return OPTIMIZERS[name].class_name


@contextmanager
def evaluation_mode(optimizer) -> Iterator[None]:
    """Schedule-free optimizers' evaluation weights for the duration (others: nothing to do)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if not hasattr(inner, "eval"):
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()
