"""What is compared: the optimisations under test (`Options`) and how variants are named.

A variant is the base options with some switched: `default`, `+gradient_checkpointing+8bit`,
`-sdpa`, `bf16`... The trainers' defaults are the base, so `default` measures what a user gets
without flags; `--sweep` flips each option by itself to show what each one is worth. The UNet
options (attention processor, memory format, compilation) act on the loaded UNet, for the
floor and our trainer alike; precision, checkpointing and 8-bit Adam are the trainers' flags.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class Options:
    """The optimisations under test. The defaults are the trainers' defaults."""

    latent_cache: bool = True  # floor only: the trainers always cache latents
    gradient_checkpointing: bool = False
    sdpa: bool = True  # diffusers' AttnProcessor2_0 (torch SDPA) vs the plain AttnProcessor
    channels_last: bool = False
    compile: bool = False
    use_8bit_adam: bool = False
    mixed_precision: str = "no"

    def label(self, base: Options) -> str:
        """`default`, or the differences from `base` as `+name` / `-name` / `bf16`."""
        parts = []
        for name, value in asdict(self).items():
            if value != getattr(base, name):
                parts.append(value if isinstance(value, str) else ("+" if value else "-") + name)
        return " ".join(parts) or "default"


OPTION_ALIASES = {"gc": "gradient_checkpointing", "8bit": "use_8bit_adam", "cache": "latent_cache"}


def parse_variant(text: str, base: Options) -> Options:
    """`default`, `+gradient_checkpointing+8bit`, `-sdpa`, `bf16`, `+compile-latent_cache`..."""
    if text == "default":
        return base
    changes: dict = {}
    for sign, name in re.findall(r"([+-]?)([A-Za-z0-9_]+)", text):
        if name in ("no", "fp16", "bf16") and not sign:
            changes["mixed_precision"] = name
            continue
        name = OPTION_ALIASES.get(name, name)
        if name not in Options.__dataclass_fields__ or name == "mixed_precision" or not sign:
            raise SystemExit(f"--variants {text!r}: unknown option {name!r} (use +name / -name, fp16, bf16)")
        changes[name] = sign == "+"
    return replace(base, **changes)


def sweep_variants(base: Options) -> list[Options]:
    """The base and, one at a time, each optimisation flipped: the effect of each."""
    variants = [base]
    for name, value in asdict(base).items():
        if isinstance(value, bool) and name != "latent_cache":
            variants.append(replace(base, **{name: not value}))
    variants.append(replace(base, mixed_precision="bf16" if base.mixed_precision != "bf16" else "no"))
    return variants


def apply_unet_options(unet, options: Options) -> None:
    """Attention processor, memory format and compilation: the options that act on the UNet
    the loop already loaded (precision and checkpointing are the trainers' own flags)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if options.sdpa else AttnProcessor())
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.compile:
        unet.compile()
