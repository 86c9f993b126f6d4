"""SD1 / SD2 / SDXL differences applied to one loaded pipeline.

The facts live in `tinv_lib.models.architecture`; `ModelFamily` joins them to a pipeline so the
training loop, the trainers, prompt encoding (and through it generation) never branch on the
architecture themselves: they ask the family for the text encoders and their widths, the
embedding keys, the UNet's extra conditioning (SDXL's pooled text and size ids) and the training
target (eps or v, read from the model's own scheduler config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinv_lib.models.architecture import Architecture, of_pipeline, vae_factor


@dataclass
class ModelFamily:
    """The parts of a loaded pipeline that training needs, and how they differ by architecture."""

    architecture: Architecture
    pipe: object

    @property
    def arch(self) -> str:
        """"sd1" | "sd2" | "sdxl"."""
        return self.architecture.name

    @property
    def tokenizers(self) -> list:
        return [getattr(self.pipe, slot.tokenizer) for slot in self.architecture.encoders]

    @property
    def text_encoders(self) -> list:
        return [getattr(self.pipe, slot.text_encoder) for slot in self.architecture.encoders]

    @property
    def widths(self) -> list[int]:
        return [encoder.get_input_embeddings().weight.shape[1] for encoder in self.text_encoders]

    @property
    def zero_empty_negative(self) -> bool:
        """An empty negative prompt encodes as zeros (SDXL's `force_zeros_for_empty_prompt`,
        on unless the pipeline's config turns it off); SD1/SD2 encode it as text."""
        if not self.architecture.text_time_conditioning:
            return False
        return bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", True))

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (8 for every real SD VAE)."""
        return vae_factor(self.vae.config)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this so every UNet downsampling divides evenly."""
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def noise_scheduler(self):
        """A DDPM scheduler with the model's betas and prediction type, for training."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def training_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """eps models learn the noise, v models the velocity (from the scheduler config)."""
        if scheduler.config.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def unet_extra(self, pooled: torch.Tensor | None, sizes: list[tuple[int, int]], device, dtype) -> dict:
        """SDXL's added conditioning: pooled text and (original, crop, target) size ids.

        Training images are used whole at their training size, so original = target = that size
        and the crop is (0, 0): the same ids the SDXL pipeline uses when generating at that size.
        """
        if not self.architecture.text_time_conditioning:
            return {}
        ids = torch.tensor([[h, w, 0, 0, h, w] for (w, h) in sizes], device=device, dtype=dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled.to(device, dtype), "time_ids": ids}}


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline."""
    return ModelFamily(of_pipeline(pipe), pipe)
