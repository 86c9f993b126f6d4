"""What the loss is: the per-sample weighting of the denoising loss (min-SNR-γ).

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
