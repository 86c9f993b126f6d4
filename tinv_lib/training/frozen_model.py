"""The base model as training needs it: loaded, frozen, on the device in the run's precision.

Only the trainables (new vectors, hypernetwork modules) get gradients; every weight of the base
model stays bit-identical. The UNet and text encoders run in the mixed-precision dtype; the VAE
stays in float32, since it only encodes the training images once (latent caching) and its
fp16 output is known to overflow.
"""

from __future__ import annotations

import torch


def load_frozen_model(model: str, model_config: str | None, device: torch.device, weight_dtype: torch.dtype,
                      gradient_checkpointing: bool):
    """(family, model_info) for `model` (a diffusers folder or a single file), ready to train against."""
    from tinv_lib.models.family import family_of
    from tinv_lib.models.loading import load_base_model

    pipe, model_info = load_base_model(model, model_config)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    for module in [family.unet, family.vae, *family.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    for module in [family.unet, *family.text_encoders]:
        module.to(device) if weight_dtype == torch.float32 else module.to(device, weight_dtype)
    family.vae.to(device)
    if gradient_checkpointing:
        family.unet.enable_gradient_checkpointing()
        family.unet.train()  # its dropout is 0; diffusers' blocks checkpoint whenever gradients are on
        for encoder in family.text_encoders:
            encoder.gradient_checkpointing_enable()
            _checkpointing_layers_in_training_mode(encoder)
    return family, model_info


def _checkpointing_layers_in_training_mode(encoder: torch.nn.Module) -> None:
    """transformers checkpoints a layer only while that layer is in training mode, but the frozen
    encoder must compute what it computes at inference: T5's dropout (0.1 in FLUX.1's and SD3's
    T5-XXL, inside the layers' attention and feed-forward) would make every step's prompt random.
    So the checkpointed layers alone are marked training; everything inside them stays in eval."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in encoder.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.training = True
