"""Hypernetwork training on the shared training core: the hypernetwork as a `TrainingTask`.

The hypernetwork's (k, v) modules are installed on the UNet's attention layers for the whole run
(`tinv_lib.hypernetworks.apply`); the base model stays frozen and bit-identical. The text
encoder is frozen too, so each distinct prompt is encoded once and reused (A1111 caches the
conditioning the same way).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.common.names import sanitize_name
from tinv_lib.hypernetworks import (
    WEIGHT_INITS,
    activation_names,
    context_widths,
    create_hypernetwork,
    install_hypernetworks,
    load_hypernetwork,
    load_optimizer_sidecar,
    make_options,
    parse_sizes,
    save_hypernetwork,
    save_optimizer_sidecar,
)
from tinv_lib.training.arguments import (
    HelpFormatter,
    add_model_arguments,
    add_training_arguments,
    mark_required,
    parse_training_args,
)
from tinv_lib.training.optimizers import sidecar_name
from tinv_lib.training.preflight import require_file

KIND = "hypernetwork"
REQUIRED = ["pretrained_model_name_or_path", "hypernetwork_name"]
PROMPT_CACHE_BYTES = 512 * 2**20  # most recent prompt encodings kept (frozen text encoder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an A1111-compatible hypernetwork (A1111 Train tab features on Accelerate).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("hypernetwork")
    group.add_argument("--hypernetwork_name", help="the hypernetwork's name and file stem")
    group.add_argument("--layer_structure", default="1, 2, 1", help="width multipliers of the layers")
    group.add_argument("--activation_func", default="linear", choices=activation_names(),
                       help="activation after each hidden linear (swish = Hardswish, as in A1111)")
    group.add_argument("--weight_init", default="Normal", choices=list(WEIGHT_INITS), help="initialisation of the linear weights")
    group.add_argument("--layer_norm", action="store_true", help="LayerNorm after each linear")
    group.add_argument("--dropout_structure", default="", help='dropout per layer, e.g. "0, 0.1, 0"; empty: none')
    group.add_argument("--activate_output", action="store_true", help="activation after the last linear too")
    group.add_argument("--sizes", default="", help="context widths to cover (default: every k/v width of the model)")
    group.add_argument("--resume_from_hypernetwork", help="continue training this .pt (its step count continues)")
    add_training_arguments(parser, default_lr="0.00001", default_template="hypernetwork", default_weight_decay=0.01)
    mark_required(parser, REQUIRED)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_training_args(build_parser(), argv, REQUIRED, _check_hypernetwork_flags)
    args.hypernetwork_name = sanitize_name(args.hypernetwork_name, "hypernetwork")
    return args


def _check_hypernetwork_flags(args: argparse.Namespace) -> None:
    from tinv_lib.hypernetworks.apply import refuse_flow_models

    refuse_flow_models(args.pretrained_model_name_or_path, model_config=args.model_config)
    require_file("resume_from_hypernetwork", args.resume_from_hypernetwork)
    if not args.resume_from_hypernetwork:
        _create_options(args)  # bad structures and dropout values fail here, before the model loads
        if args.sizes:
            parse_sizes(args.sizes)


def _create_options(args: argparse.Namespace):
    """The create options of a new hypernetwork, from the flags (A1111's create rules)."""
    return make_options(args.layer_structure, args.activation_func, args.weight_init, args.layer_norm,
                        dropout_structure=args.dropout_structure or None, activate_output=args.activate_output)


class HypernetworkTask:
    """One hypernetwork, installed on the UNet while it trains."""

    kind = KIND
    norm_control = None  # the norm options are textual inversion's

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.name = args.hypernetwork_name
        self.optimizer_state: dict | None = None
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._cache_bytes = 0
        self.resumed_from: Path | None = None  # the --resume_from_hypernetwork file, once read

    def setup(self, family, model_info, args, device: torch.device) -> int:
        from tinv_lib.hypernetworks.apply import refuse_flow_models
        from tinv_lib.prompts.encoding import PromptEncoder

        self.family, self.model_info = family, model_info
        refuse_flow_models(args.pretrained_model_name_or_path, family.architecture)  # hub ids: known only now
        if args.resume_from_hypernetwork:
            self.network = load_hypernetwork(args.resume_from_hypernetwork)
            self.optimizer_state = _matching_optimizer_state(args.resume_from_hypernetwork, args.optimizer)
            self.resumed_from = Path(args.resume_from_hypernetwork)
        else:
            options = _create_options(args)
            sizes = parse_sizes(args.sizes) if args.sizes else context_widths(family.unet)
            self.network = create_hypernetwork(self.name, sizes, options, seed=args.seed)
        self.network.name = self.name
        self.network.to(device, torch.float32)
        self.network.train()
        self.remove = install_hypernetworks(family.unet, [(self.network, 1.0)])
        self.prompt_encoder = PromptEncoder.from_pipeline(family.pipe)
        return int(self.network.step or 0)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.parameters())

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.parameters()}]

    def set_training(self, training: bool) -> None:
        """Training mode: dropout on, multiplier ignored (A1111); eval mode for previews."""
        self.network.train(training)

    def conditioning(self, prompts: list[str]):
        """Frozen text encoder: each distinct prompt is encoded once, then reused.

        The cache keeps the most recently used encodings up to `PROMPT_CACHE_BYTES`: with tag
        shuffling or dropout nearly every prompt is new, and an unbounded cache would grow with
        the length of the run (an SDXL encoding is 630 KB)."""
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                continue
            with torch.no_grad():
                encoded = self.prompt_encoder.encode([prompt])
            entry = (encoded.embeds[0], None if encoded.pooled is None else encoded.pooled[0])
            self._cache[prompt] = entry
            self._cache_bytes += _bytes_of(entry)
        entries = [self._cache[p] for p in prompts]
        while self._cache_bytes > PROMPT_CACHE_BYTES and len(self._cache) > len(set(prompts)):
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= _bytes_of(evicted)
        hidden = _stack_padded([entry[0] for entry in entries])
        pooled = [entry[1] for entry in entries]
        return hidden, (torch.stack(pooled) if pooled[0] is not None else None)

    def check_prompts(self, prompts: list[str]) -> None:
        """Any prompt trains a hypernetwork; an all-empty dataset of captions is suspicious."""
        if not any(prompt.strip() for prompt in prompts):
            raise TinvError("every training prompt is empty: give captions (.txt or file names) or a template")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {key: value.detach() for key, value in self.network.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.network.load_state_dict({k: v for k, v in tensors.items()}, strict=False)
        if missing or unexpected:
            raise TinvError(f"the checkpoint's hypernetwork does not match this one ({len(missing)} missing tensors)")

    def save_files(self, output_dir: Path, step: int, final: bool, optimizer_state: dict | None,
                   best: bool = False) -> list[Path]:
        """Final `<name>.pt`; intermediate `hypernetworks/<name>-<step>.pt`; `best`: `<name>-best.pt`
        (`--keep_best`); the name inside stays, the step is the file's."""
        self.network.step = step
        self.network.sd_checkpoint = self.model_info.short_hash or None
        self.network.sd_checkpoint_name = self.model_info.name
        if best:
            path = output_dir / f"{self.name}-best.pt"
        else:
            path = output_dir / (f"{self.name}.pt" if final else f"hypernetworks/{self.name}-{step}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_hypernetwork(self.network, path)
        if optimizer_state is not None:
            save_optimizer_sidecar(path, optimizer_state, sidecar_name(self.args.optimizer))
        return [path]

    def describe_saved(self, step: int, final: bool, logger) -> None:
        """Nothing to report: a hypernetwork has no vocabulary to be compared with."""

    def preview(self, family, request) -> list:
        """Preview images with the hypernetwork at multiplier 1 (it is installed on the UNet)."""
        from tinv_lib.generation.txt2img import generate

        r = request
        return generate(family.pipe, r.prompt, r.negative, seed=r.seed, steps=r.steps, cfg_scale=r.cfg_scale,
                        width=r.size[0], height=r.size[1], batch_size=r.count, encoder=self.prompt_encoder).images


def _matching_optimizer_state(path: str, optimizer: str) -> dict | None:
    """The sidecar's optimizer state if it was saved by the optimizer this run uses (A1111 checks the name too)."""
    saved = load_optimizer_sidecar(path)
    if saved is None:
        return None
    if saved.name != sidecar_name(optimizer):
        print(f"notice: {path}.optim holds {saved.name} state, not {sidecar_name(optimizer)}; "
              "starting with a fresh optimizer", file=sys.stderr)
        return None
    return saved.state_dict


def _bytes_of(tensors: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _stack_padded(items: list[torch.Tensor]) -> torch.Tensor:
    """Stack [tokens, width] tensors, padding shorter prompts with their last vector (A1111)."""
    longest = max(item.shape[0] for item in items)
    return torch.stack([torch.cat([item, item[-1:].expand(longest - item.shape[0], -1)]) for item in items])


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_hypernetwork.py`."""
    from tinv_lib.training.runner import run_script

    return run_script(parse_args, HypernetworkTask, argv)
