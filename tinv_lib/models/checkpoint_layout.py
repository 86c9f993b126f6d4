"""Key layout of single-file ("original", LDM / A1111) checkpoints versus diffusers models.

A1111 users hold one `.safetensors`/`.ckpt` per model, with the key names of the original
CompVis/Stability code. One table of rules, generated from the diffusers model's own keys, maps
every diffusers tensor to its original name, so the same table serves both directions: writing a
single file (tiny test models) and loading one (`tinv_lib.models.loading`). Besides renames, these
shape changes exist: VAE attention projections are 1x1 convolutions in the original layout,
OpenCLIP stores q/k/v as one `in_proj` tensor, and OpenCLIP's text projection is transposed. The
FLUX.1 (BFL) and SD3 (SAI) transformers fuse q/k/v (FLUX.1's single blocks also the MLP input)
into one tensor and order their final modulation shift-then-scale where diffusers has
scale-then-shift. diffusers' own FLUX.1 reader assumes the real model's width (3072); these rules
take every size from the model's config, so any width reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["same", "conv1x1", "qkv", "transpose", "concat", "swap"]

UNET_PREFIX = "model.diffusion_model."  # also ComfyUI's and SAI's prefix of FLUX.1 / SD3 transformers
VAE_PREFIX = "first_stage_model."
VAE_PREFIXES = (VAE_PREFIX, "vae.")  # SD and SD3 files; ComfyUI's all-in-one FLUX.1 files


@dataclass(frozen=True)
class KeyRule:
    """One original-layout tensor and the diffusers tensor(s) it is made from."""

    original: str
    diffusers: tuple[str, ...]
    kind: Kind = "same"
    sizes: tuple[int, ...] = ()  # "concat": rows of each diffusers tensor, in order


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


def vae_rules(vae_keys: list[str], config: dict, prefix: str = VAE_PREFIX) -> list[KeyRule]:
    """Rules for an AutoencoderKL with the given config, its keys under `prefix`."""
    rules = [_vae_rule(key, len(config["block_out_channels"])) for key in vae_keys]
    return [KeyRule(prefix + rule.original.removeprefix(VAE_PREFIX), rule.diffusers, rule.kind) for rule in rules]


# ------------------------------------------------------------------------------ text encoders


def hf_clip_rules(keys: list[str], prefix: str) -> list[KeyRule]:
    """OpenAI CLIP (SD1, SDXL's first encoder, FLUX.1's and SD3's CLIPs) keeps the transformers
    names under a prefix that ends in `text_model.`; a text projection sits beside `text_model`.

    transformers 5 saves CLIPTextModel keys without `text_model.`; the original layout has it.
    """
    root = prefix.removesuffix("text_model.")
    return [KeyRule(root + key if key == "text_projection.weight" else prefix + key.removeprefix("text_model."), (key,))
            for key in keys]


def t5_rules(keys: list[str], prefix: str) -> list[KeyRule]:
    """T5 encoders (FLUX.1, SD3) keep the transformers names under a prefix; the input embedding
    is stored once, as `shared.weight` (transformers ties `encoder.embed_tokens` to it)."""
    return [KeyRule(prefix + ("shared.weight" if key == "encoder.embed_tokens.weight" else key), (key,))
            for key in keys]


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


# ---------------------------------------------------------------------- FLUX.1 and SD3 transformers


@dataclass(frozen=True)
class _Blocks:
    """How one kind of numbered transformer block is named in each layout."""

    diffusers: str  # e.g. "transformer_blocks"
    original: str  # e.g. "double_blocks"
    renames: tuple[tuple[str, str], ...]  # (diffusers name start, original name start) within a block
    fused: tuple[tuple[tuple[str, ...], str], ...]  # (diffusers modules, the one original module)


_FLUX_TOP = (
    ("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
    ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
    ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
    ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
    ("context_embedder.", "txt_in."), ("x_embedder.", "img_in."), ("proj_out.", "final_layer.linear."),
)
_FLUX_BLOCKS = (
    _Blocks("transformer_blocks", "double_blocks", (
        ("norm1.linear.", "img_mod.lin."), ("norm1_context.linear.", "txt_mod.lin."),
        ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"), ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
        ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
        ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
        ("attn.to_out.0.", "img_attn.proj."), ("attn.to_add_out.", "txt_attn.proj."),
        ("ff.net.0.proj.", "img_mlp.0."), ("ff.net.2.", "img_mlp.2."),
        ("ff_context.net.0.proj.", "txt_mlp.0."), ("ff_context.net.2.", "txt_mlp.2."),
    ), (
        (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"),
        (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
    )),
    _Blocks("single_transformer_blocks", "single_blocks", (
        ("norm.linear.", "modulation.lin."), ("attn.norm_q.weight", "norm.query_norm.scale"),
        ("attn.norm_k.weight", "norm.key_norm.scale"), ("proj_out.", "linear2."),
    ), ((("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1"),)),
)
_SD3_TOP = (
    ("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj.", "x_embedder.proj."),
    ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
    ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
    ("context_embedder.", "context_embedder."), ("proj_out.", "final_layer.linear."),
)
_SD3_BLOCKS = (
    _Blocks("transformer_blocks", "joint_blocks", (
        ("norm1.linear.", "x_block.adaLN_modulation.1."), ("norm1_context.linear.", "context_block.adaLN_modulation.1."),
        ("attn.norm_q.", "x_block.attn.ln_q."), ("attn.norm_k.", "x_block.attn.ln_k."),
        ("attn.norm_added_q.", "context_block.attn.ln_q."), ("attn.norm_added_k.", "context_block.attn.ln_k."),
        ("attn.to_out.0.", "x_block.attn.proj."), ("attn.to_add_out.", "context_block.attn.proj."),
        ("attn2.norm_q.", "x_block.attn2.ln_q."), ("attn2.norm_k.", "x_block.attn2.ln_k."),
        ("attn2.to_out.0.", "x_block.attn2.proj."),
        ("ff.net.0.proj.", "x_block.mlp.fc1."), ("ff.net.2.", "x_block.mlp.fc2."),
        ("ff_context.net.0.proj.", "context_block.mlp.fc1."), ("ff_context.net.2.", "context_block.mlp.fc2."),
    ), (
        (("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"),
        (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"),
        (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv"),
    )),
)
# The final modulation: shift then scale in the original layout, scale then shift in diffusers.
_FINAL_MODULATION = ("norm_out.linear.", "final_layer.adaLN_modulation.1.")


def _block_rule(key: str, shapes: dict, blocks: _Blocks, index: str, rest: str, prefix: str) -> KeyRule | None:
    """The rule for one key inside a numbered block; None for the later parts of a fused group
    (the group's rule comes with its first part)."""
    stem, original = f"{blocks.diffusers}.{index}.", f"{prefix}{blocks.original}.{index}."
    for parts, fused in blocks.fused:
        for position, part in enumerate(parts):
            if rest.startswith(part + "."):
                if position:
                    return None
                what = rest[len(part) + 1:]
                members = tuple(f"{stem}{name}.{what}" for name in parts)
                return KeyRule(f"{original}{fused}.{what}", members, "concat",
                               tuple(shapes[member][0] for member in members))
    for new, old in blocks.renames:
        if rest.startswith(new):
            return KeyRule(original + old + rest[len(new):], (key,))
    raise KeyError(f"no original-layout name for transformer key {key!r}")


def _transformer_rules(shapes: dict, top: tuple, blocks: tuple[_Blocks, ...], prefix: str) -> list[KeyRule]:
    rules: list[KeyRule] = []
    by_name = {kind.diffusers: kind for kind in blocks}
    for key in shapes:
        if key.startswith(_FINAL_MODULATION[0]):
            rules.append(KeyRule(prefix + _FINAL_MODULATION[1] + key[len(_FINAL_MODULATION[0]):], (key,), "swap"))
        elif match := re.match(r"(\w+)\.(\d+)\.(.*)", key):
            if match[1] not in by_name:
                raise KeyError(f"no original-layout name for transformer key {key!r}")
            if rule := _block_rule(key, shapes, by_name[match[1]], match[2], match[3], prefix):
                rules.append(rule)
        else:
            new, old = next(((new, old) for new, old in top if key.startswith(new)), (None, None))
            if new is None:
                raise KeyError(f"no original-layout name for transformer key {key!r}")
            rules.append(KeyRule(prefix + old + key[len(new):], (key,)))
    return rules


def flux_rules(shapes: dict[str, torch.Size], prefix: str = "") -> list[KeyRule]:
    """Rules for a FluxTransformer2DModel (keys and shapes of its state dict): BFL's layout, bare
    (`flux1-dev.safetensors`) or under ComfyUI's `model.diffusion_model.`."""
    return _transformer_rules(shapes, _FLUX_TOP, _FLUX_BLOCKS, prefix)


def sd3_rules(shapes: dict[str, torch.Size], prefix: str = UNET_PREFIX) -> list[KeyRule]:
    """Rules for an SD3Transformer2DModel: SAI's `joint_blocks` layout. The last block reads
    the text only (no output for it), and its text modulation is ordered like the final one."""
    rules = _transformer_rules(shapes, _SD3_TOP, _SD3_BLOCKS, prefix)
    last = max(int(key.split(".")[1]) for key in shapes if key.startswith("transformer_blocks."))
    swapped = f"transformer_blocks.{last}.norm1_context.linear."
    return [KeyRule(rule.original, rule.diffusers, "swap") if rule.diffusers[0].startswith(swapped) else rule
            for rule in rules]


# ------------------------------------------------------------------------------- conversions


def to_original(rules: list[KeyRule], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build original-layout tensors from a diffusers state dict."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = [state[key] for key in rule.diffusers]
        if rule.kind in ("qkv", "concat"):
            out[rule.original] = torch.cat(tensors, dim=0)
        elif rule.kind == "swap":
            out[rule.original] = _swap_halves(tensors[0])
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
        elif rule.kind == "concat":
            if tensor.shape[0] != sum(rule.sizes):
                raise ValueError(f"{where}: {rule.original} has {tensor.shape[0]} rows, expected {sum(rule.sizes)}")
            for key, part in zip(rule.diffusers, torch.split(tensor, rule.sizes, dim=0)):
                out[key] = part
        elif rule.kind == "swap":
            out[rule.diffusers[0]] = _swap_halves(tensor)
        elif rule.kind == "conv1x1":
            out[rule.diffusers[0]] = tensor.reshape(tensor.shape[0], tensor.shape[1])
        elif rule.kind == "transpose":
            out[rule.diffusers[0]] = tensor.t()
        else:
            out[rule.diffusers[0]] = tensor
    return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Shift-then-scale to scale-then-shift and back (the swap is its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
