"""The toy model's AutoencoderKL: 64 px RGB to 16x16x4 latents, and its training.

Trained first and alone (reconstruction plus a very light KL term, as SD's VAE), then frozen:
the diffusion model is trained on its cached latents. The scaling factor stored in its config is
measured from those latents (1 / std), as SD 1.x's 0.18215 was, so the diffusion model sees
unit-variance inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 64,
    "scaling_factor": 1.0,  # replaced by `measure_scaling_factor` after training
}


def build_vae(config: dict | None = None):
    """A fresh AutoencoderKL (random weights from the current torch seed)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or VAE_CONFIG))


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) to float (N, 3, H, W) in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of `to_model_range` (clamped, rounded)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def vae_loss(vae, batch: torch.Tensor, kl_weight: float = 1e-7) -> tuple[torch.Tensor, float]:
    """L1 + MSE reconstruction plus a tiny KL; returns (loss, reconstruction MSE).

    L1 keeps the flat colours and hard edges of the toy world crisp; the KL only stops the
    latent scale from drifting, so sampling the posterior adds little noise.
    """
    posterior = vae.encode(batch).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = torch.mean((recon - batch) ** 2)
    loss = torch.mean(torch.abs(recon - batch)) + mse + kl_weight * posterior.kl().mean()
    return loss, float(mse.detach())


def train_vae(
    vae,
    images: np.ndarray,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    crop: int = 32,
    log: Callable[[int, float], None] | None = None,
):
    """Train `vae` on random `crop`-pixel crops of `images` (uint8 NHWC); deterministic from `seed`.

    The autoencoder is convolutional, so crops teach it the same local rendering at a quarter of
    the cost of whole 64 px images. AdamW with a short warm-up and cosine decay; `log(step, mse)`
    is called every 50 steps.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(steps, warmup=min(100, steps // 10 + 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    vae.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator).numpy()
        top, left = (torch.randint(0, images.shape[1] - crop + 1, (2,), generator=generator) // 4 * 4).tolist()
        batch = to_model_range(np.ascontiguousarray(images[index, top : top + crop, left : left + crop]))
        torch.manual_seed(seed * 1_000_003 + step)  # the posterior sample of this step
        loss, mse = vae_loss(vae, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(step, mse)
    vae.eval()
    return vae


def warmup_cosine(steps: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of `images` (uint8 NHWC), unscaled, as float32 (N, 4, h, w)."""
    vae.eval()
    parts = [
        vae.encode(to_model_range(images[i : i + batch_size])).latent_dist.mean
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Unscaled latents back to uint8 NHWC images."""
    vae.eval()
    parts = [to_uint8(vae.decode(latents[i : i + batch_size]).sample) for i in range(0, len(latents), batch_size)]
    return np.concatenate(parts)


def measure_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the latents, rounded to 5 digits: what SD stores as `scaling_factor`."""
    return round(1.0 / float(latents.float().std()), 5)
