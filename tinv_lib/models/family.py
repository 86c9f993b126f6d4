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
    def t5_length(self) -> int:
        """T5 ids per prompt: the pipeline's default `max_sequence_length`, or the T5 tokenizer's
        `model_max_length` where that is shorter (a model trained on shorter prompts, as
        models/toy-flux: FLUX.1 attends to every padding token, so only that length is right);
        0 without T5."""
        for slot, tokenizer in zip(self.architecture.encoders, self.tokenizers):
            if slot.is_t5:
                return min(self.architecture.t5_max_length, int(tokenizer.model_max_length))
        return 0

    def guidance_arguments(self, cfg_scale: float) -> dict:
        """The pipeline call's guidance: `guidance_scale` (classifier-free guidance; FLUX.1-dev's
        distilled guidance embedding), or for a FLUX.1 transformer without that embedding
        (schnell's layout) diffusers' `true_cfg_scale`, which needs a negative prompt."""
        transformer = self.unet.config if self.architecture.flow_model == "flux" else None
        if transformer is not None and not transformer.guidance_embeds:
            return {"true_cfg_scale": cfg_scale}
        return {"guidance_scale": cfg_scale}

    @property
    def unet(self):
        """The denoiser: the UNet, or FLUX.1's / SD3's transformer."""
        return self.pipe.transformer if self.architecture.flow_matching else self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (8 for every real SD VAE)."""
        return vae_factor(self.vae.config)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this so every UNet downsampling divides evenly (the
        flow transformers: so latents split into their 2x2 patches)."""
        if self.architecture.flow_matching:
            return self.latent_factor * 2
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def noise_scheduler(self):
        """A DDPM scheduler with the model's betas and prediction type, for training; for the
        flow-matching families a copy of their own scheduler (its shift settings)."""
        from diffusers import DDPMScheduler

        if self.architecture.flow_matching:
            return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def prediction_and_target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                              conditioning: tuple, sizes: list[tuple[int, int]], dtype: torch.dtype):
        """The denoiser's prediction for the noised latents and what it should have predicted:
        eps or v for the UNets (DDPM noising), the velocity for FLUX.1 and SD3 (`models.flow`)."""
        if self.architecture.flow_matching:
            from tinv_lib.models.flow import prediction_and_target

            return prediction_and_target(self.pipe, self.architecture.flow_model, latents, noise, timesteps,
                                         conditioning, dtype)
        hidden, pooled = conditioning
        noisy = scheduler.add_noise(latents, noise, timesteps)
        extra = self.unet_extra(pooled, sizes, latents.device, dtype)
        prediction = self.unet(noisy.to(dtype), timesteps, hidden.to(dtype), **extra).sample
        return prediction, self.training_target(scheduler, latents, noise, timesteps)

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
