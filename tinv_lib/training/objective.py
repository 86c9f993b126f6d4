"""What the loss is: the denoising loss (`denoising_loss`) and its per-sample weighting (min-SNR-γ).

The loop's loss is the mean squared error between the UNet's prediction and the training target
(noise for eps models, velocity for v models). Min-SNR-γ (Hang et al. 2023, the diffusers
examples' and kohya's `--snr_gamma`) weighs each sample by how much its timestep can still teach:
low-noise timesteps, whose loss is small but dominates the gradient direction, are capped at γ.

For a timestep with signal-to-noise ratio SNR = ᾱ / (1 − ᾱ):
  eps prediction:  w = min(SNR, γ) / SNR
  v prediction:    w = min(SNR, γ) / (SNR + 1)
(the v target's loss is already SNR + 1 times the eps loss expressed in x0, hence the +1).

The noise-side options (`--noise_offset`, the timestep range) change the samples, not the loss,
and live with the other random draws in `batches`.
"""

from __future__ import annotations

import torch


def signal_to_noise(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR of each timestep under the scheduler's own noise schedule."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    return (alphas_cumprod / (1.0 - alphas_cumprod)).float()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight of each sample, for the scheduler's prediction type."""
    snr = signal_to_noise(scheduler, timesteps)
    capped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return capped / (snr + 1.0)
    return capped / snr


def sample_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
    """Per-sample loss weights for this run's options; None when every sample weighs 1."""
    if snr_gamma is None:
        return None
    return min_snr_weights(scheduler, timesteps, snr_gamma)


def denoising_loss(family, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   conditioning: tuple[torch.Tensor, torch.Tensor | None], sizes: list[tuple[int, int]],
                   dtype: torch.dtype, pixel_weights: torch.Tensor | None = None,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """The loss itself, the one implementation training, validation and evaluation share: the
    MSE between the UNet's prediction for the noised latents and the family's training target
    (noise or velocity), weighted per latent pixel (`pixel_weights` [B, H, W]: masks, alpha) and,
    with `snr_gamma`, per sample.

    `conditioning` is (hidden states, SDXL pooled embeds); `sizes` the images' (width, height);
    the UNet runs in `dtype`, the loss in float32."""
    import torch.nn.functional as F

    prediction, target = family.prediction_and_target(scheduler, latents, noise, timesteps, conditioning, sizes, dtype)
    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if pixel_weights is not None:
        per_element = per_element * pixel_weights[:, None]
    per_sample = sample_weights(scheduler, timesteps, snr_gamma)
    if per_sample is not None:
        per_element = per_element * per_sample[:, None, None, None]
    return per_element.mean()
