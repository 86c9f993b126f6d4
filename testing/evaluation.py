"""A fixed-batch evaluation loss: the same images, noise and timesteps every time.

Training losses jump with the random timestep of each step, so "did it learn?" is answered by
evaluating the denoising loss on one fixed batch before and after training (used by the tests).
The loss is the product's own (`tinv_lib.training.objective.denoising_loss`); only the fixed
draws are made here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tinv_lib.training.objective import denoising_loss


@torch.no_grad()
def fixed_batch_loss(
    family, pixels: torch.Tensor, conditioning: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
    prompts: list[str], seed: int = 0, repeats: int = 4,
) -> float:
    """Mean loss over `repeats` fixed (noise, timestep) draws per image.

    `pixels` are [B, 3, H, W] in [-1, 1]; the latents are the VAE posterior means.
    """
    device = family.unet.device
    scheduler = family.noise_scheduler()
    latents = family.vae.encode(pixels.to(family.vae.device, family.vae.dtype)).latent_dist.mean
    latents = latents.to(device, torch.float32) * family.latent_scale
    encoded = conditioning(prompts)
    sizes = [(pixels.shape[-1], pixels.shape[-2])] * latents.shape[0]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
        total += denoising_loss(family, scheduler, latents, noise, timesteps, encoded, sizes, family.unet.dtype).item()
    return total / repeats
