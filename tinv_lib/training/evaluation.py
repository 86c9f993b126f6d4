"""A fixed-batch evaluation loss: the same images, noise and timesteps every time.

Training losses jump with the random timestep of each step, so "did it learn?" is answered by
evaluating the denoising loss on one fixed batch before and after training (used by the tests
and the quality benchmark).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def fixed_batch_loss(
    family, pixels: torch.Tensor, conditioning: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
    prompts: list[str], seed: int = 0, repeats: int = 4,
) -> float:
    """Mean MSE of the UNet's prediction over `repeats` fixed (noise, timestep) draws per image.

    `pixels` are [B, 3, H, W] in [-1, 1]; the latents are the VAE posterior means.
    """
    device = family.unet.device
    dtype = family.unet.dtype
    scheduler = family.noise_scheduler()
    latents = family.vae.encode(pixels.to(family.vae.device, family.vae.dtype)).latent_dist.mean
    latents = latents.to(device, torch.float32) * family.latent_scale
    hidden, pooled = conditioning(prompts)
    size = (pixels.shape[-1], pixels.shape[-2])
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        extra = family.unet_extra(pooled, [size] * latents.shape[0], device, dtype)
        prediction = family.unet(noisy.to(dtype), timesteps, hidden.to(dtype), **extra).sample
        target = family.training_target(scheduler, latents, noise, timesteps)
        total += F.mse_loss(prediction.float(), target.float()).item()
    return total / repeats
