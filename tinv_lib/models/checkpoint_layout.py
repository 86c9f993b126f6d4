"""Key layout of single-file ("original", LDM / A1111) checkpoints versus diffusers models.

A1111 users hold one `.safetensors`/`.ckpt` per model, with the key names of the original
CompVis/Stability code. One table of rules, generated from the diffusers model's own keys, maps
every diffusers tensor to its original name, so the same table serves both directions: writing a
single file (tiny test models) and loading one (`tinv_lib.models.loading`). Besides renames, three
shape changes exist: VAE attention projections are 1x1 convolutions in the original layout,
OpenCLIP stores q/k/v as one `in_proj` tensor, and OpenCLIP's text projection is transposed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["same", "conv1x1", "qkv", "transpose"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class KeyRule:
    """One original-layout tensor and the diffusers tensor(s) it is made from."""

    original: str
    diffusers: tuple[str, ...]
    kind: Kind = "same"


# --------------------------------------------------------------------------------------- UNet

_RESNET_UNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _unet_name(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    per_level = layers_per_block + 1
    simple = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
    }
    for new, old in simple.items():
        if key.startswith(new):
            return old + key[len(new):]

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{_RESNET_UNET[head]}.{tail}"

    if match := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{per_level * i + j + 1}.0.{resnet(rest)}"
    if match := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{per_level * i + j + 1}.1.{rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_level * (int(match[1]) + 1)}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{resnet(match[2])}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{per_level * i + j}.0.{resnet(rest)}"
    if match := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{per_level * i + j}.1.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(match[1])
        slot = 2 if up_has_attention[i] else 1
        return f"output_blocks.{per_level * i + layers_per_block}.{slot}.conv.{match[2]}"
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def unet_rules(unet_keys: list[str], config: dict) -> list[KeyRule]:
    """Rules for a UNet2DConditionModel with the given config."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block is not supported by the original layout")
    up_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    return [KeyRule(UNET_PREFIX + _unet_name(k, layers, up_attention), (k,)) for k in unet_keys]


# ---------------------------------------------------------------------------------------- VAE

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_rule(key: str, num_blocks: int) -> KeyRule:
    name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", name):
        for new, old in _VAE_ATTENTION.items():
            if match[2].startswith(new + "."):
                tail = match[2][len(new) + 1:]
                kind: Kind = "conv1x1" if tail == "weight" and old != "norm" else "same"
                return KeyRule(f"{VAE_PREFIX}{match[1]}.mid.attn_1.{old}.{tail}", (key,), kind)
    name = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(
        r"decoder\.up_blocks\.(\d+)\.resnets\.",
        lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", name,
    )
    name = re.sub(
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.", name,
    )
    return KeyRule(VAE_PREFIX + name, (key,))


def vae_rules(vae_keys: list[str], config: dict) -> list[KeyRule]:
    """Rules for an AutoencoderKL with the given config."""
    return [_vae_rule(key, len(config["block_out_channels"])) for key in vae_keys]


# ------------------------------------------------------------------------------ text encoders


def hf_clip_rules(keys: list[str], prefix: str) -> list[KeyRule]:
    """OpenAI CLIP (SD1, SDXL's first encoder) keeps the transformers names under a prefix.

    transformers 5 saves CLIP keys without `text_model.`; the original layout has it.
    """
    return [KeyRule(prefix + key.removeprefix("text_model."), (key,)) for key in keys]


def open_clip_rules(keys: list[str], prefix: str) -> list[KeyRule]:
    """OpenCLIP (SD2, SDXL's second encoder): renamed keys, fused q/k/v, transposed projection."""
    rules: list[KeyRule] = []
    key_set = set(keys)
    for key in keys:
        bare = key.removeprefix("text_model.")
        text_prefix = key[: len(key) - len(bare)]
        if match := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", bare):
            layer, what = match[1], match[2]
            parts = tuple(f"{text_prefix}encoder.layers.{layer}.self_attn.{p}_proj.{what}" for p in "qkv")
            if all(part in key_set for part in parts):
                rules.append(KeyRule(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{what}", parts, "qkv"))
            continue
        if re.match(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", bare):
            continue
        if bare == "text_projection.weight":
            rules.append(KeyRule(prefix + "text_projection", (key,), "transpose"))
            continue
        name = bare
        for new, old in (
            ("embeddings.token_embedding.weight", "token_embedding.weight"),
            ("embeddings.position_embedding.weight", "positional_embedding"),
            ("final_layer_norm.", "ln_final."),
        ):
            name = name.replace(new, old)
        name = re.sub(r"encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1.", name)
        for new, old in (
            ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"),
        ):
            name = name.replace(new, old)
        rules.append(KeyRule(prefix + name, (key,)))
    return rules


# ------------------------------------------------------------------------------- conversions


def to_original(rules: list[KeyRule], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build original-layout tensors from a diffusers state dict."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = [state[key] for key in rule.diffusers]
        if rule.kind == "qkv":
            out[rule.original] = torch.cat(tensors, dim=0)
        elif rule.kind == "conv1x1":
            out[rule.original] = tensors[0].reshape(*tensors[0].shape, 1, 1)
        elif rule.kind == "transpose":
            out[rule.original] = tensors[0].t().contiguous()
        else:
            out[rule.original] = tensors[0]
    return out


def from_original(
    rules: list[KeyRule], original: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Build a diffusers state dict from original-layout tensors; missing keys are an error."""
    missing = [rule.original for rule in rules if rule.original not in original]
    if missing:
        raise KeyError(f"{where}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = original[rule.original]
        if rule.kind == "qkv":
            for key, part in zip(rule.diffusers, torch.chunk(tensor, 3, dim=0)):
                out[key] = part
        elif rule.kind == "conv1x1":
            out[rule.diffusers[0]] = tensor.reshape(tensor.shape[0], tensor.shape[1])
        elif rule.kind == "transpose":
            out[rule.diffusers[0]] = tensor.t()
        else:
            out[rule.diffusers[0]] = tensor
    return out
