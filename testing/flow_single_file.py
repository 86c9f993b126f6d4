"""Single-file FLUX.1 and SD3 checkpoints in the layouts real files have, from tiny pipelines.

Users hold these models as one `.safetensors`: BFL's `flux1-dev.safetensors` (the transformer
alone, bare `double_blocks.N...` keys), ComfyUI's all-in-one FLUX.1 files (the transformer under
`model.diffusion_model.`, the VAE under `vae.`, CLIP-L and T5 under `text_encoders.clip_l.` and
`text_encoders.t5xxl.`) and SAI's SD3 files (`model.diffusion_model.joint_blocks.N...`, the VAE
under `first_stage_model.`, the text encoders as ComfyUI's, in the `incl_clips` files). The tests
write tiny pipelines in these layouts and load them back with `--model_config`. The key rules are
tinv's (`tinv_lib.models.checkpoint_layout`, one table for both directions); the tests check the
files against diffusers' own readers, so the layout is not only tinv's idea of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tinv_lib.models import checkpoint_layout as layout
from tinv_lib.models.architecture import of_pipeline

LAYOUTS = ("all-in-one", "transformer-only", "no-text-encoders")


def flow_single_file_state(pipe, kind: str = "all-in-one") -> dict[str, torch.Tensor]:
    """The original-layout tensors of a FLUX.1 or SD3 pipeline.

    `kind`: "all-in-one" (transformer, VAE and every text encoder, as ComfyUI's files and SAI's
    `incl_clips_t5xxl` files), "transformer-only" (BFL's bare layout for FLUX.1, SAI's prefixed
    one for SD3), "no-text-encoders" (transformer and VAE, as `sd3_medium.safetensors`).
    """
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {kind!r}; choose from {', '.join(LAYOUTS)}")
    arch = of_pipeline(pipe)
    flux = arch.flow_model == "flux"
    shapes = {key: value.shape for key, value in pipe.transformer.state_dict().items()}
    prefix = "" if flux and kind == "transformer-only" else layout.UNET_PREFIX
    rules = {"transformer": (layout.flux_rules if flux else layout.sd3_rules)(shapes, prefix)}
    if kind != "transformer-only":
        vae_prefix = "vae." if flux else layout.VAE_PREFIX
        rules["vae"] = layout.vae_rules(list(pipe.vae.state_dict()), pipe.vae.config, vae_prefix)
    if kind == "all-in-one":
        for slot in arch.encoders:
            keys = list(getattr(pipe, slot.text_encoder).state_dict())
            text_rules = layout.t5_rules if slot.is_t5 else layout.hf_clip_rules
            rules[slot.text_encoder] = text_rules(keys, slot.checkpoint_prefix)
    original: dict[str, torch.Tensor] = {}
    for name, component_rules in rules.items():
        state = {k: v.detach().cpu().contiguous() for k, v in getattr(pipe, name).state_dict().items()}
        original.update(layout.to_original(component_rules, state))
    return {key: tensor.contiguous() for key, tensor in original.items()}


def write_flow_single_file(pipe, path: str | Path, kind: str = "all-in-one") -> Path:
    """Write `flow_single_file_state(pipe, kind)` as a `.safetensors` file (T5's input embedding
    once, as `shared.weight`, as real files store it)."""
    path = Path(path)
    state = flow_single_file_state(pipe, kind)
    save_file({key: tensor.clone() for key, tensor in state.items()}, str(path), metadata={"format": "pt"})
    return path
