"""FLUX.1 and SD3: how their prompt is assembled and how their transformer is trained.

Both families are rectified-flow models: a sample at noise level sigma in [0, 1] is the straight
line `(1 - sigma) * latents + sigma * noise`, and the transformer learns its velocity
`noise - latents` (Esser et al. 2024, the SD3 paper; FLUX.1 is trained the same way). What
differs from SD1/SD2/SDXL, and between the two, lives here so the training loop and the
objective stay family-blind (docs/training.md, "FLUX.1 and SD3"):

* the prompt: FLUX.1 reads T5's last hidden state as the sequence and CLIP-L's pooled output as
  the pooled vector; SD3 sets CLIP-L's and CLIP-G's penultimate states side by side, pads them
  with zeros to T5's width and puts T5's states after them, and pools both CLIPs' projections;
* which noise levels are trained: a logit-normal draw (SD3's and FLUX.1's training recipe),
  shifted as the model's own scheduler shifts its sampling sigmas: SD3 by a constant (`shift`,
  3.0), FLUX.1-dev by a shift that grows with the image's token count (`use_dynamic_shifting`,
  `base_shift` 0.5 at 256 tokens to `max_shift` 1.15 at 4096), FLUX.1-schnell not at all;
* the latents: `(vae_latents - shift_factor) * scaling_factor`; FLUX.1 packs them into 2x2
  patches and gives the transformer positions for image and text tokens, and FLUX.1-dev's
  guidance embedding a constant.
"""

from __future__ import annotations

import math

import torch

FLUX_TRAINING_GUIDANCE = 1.0  # the value FLUX.1-dev's guidance embedding sees while training


# ------------------------------------------------------------------------------- prompts


def joint_prompt(flow_model: str, states: list[torch.Tensor], pooled: list[torch.Tensor | None]):
    """`(sequence, pooled)` for the transformer from each encoder's output, in pipeline order
    (`states[i]`: its hidden states, `pooled[i]`: its pooled or projected output)."""
    if flow_model == "flux":
        clip_pooled, t5_states = pooled[0], states[1]
        return t5_states, clip_pooled
    clip = torch.cat(states[:2], dim=-1)
    t5_states = states[2]
    clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_states], dim=-2), torch.cat(pooled[:2], dim=-1)


# ------------------------------------------------------------------------------- noise levels


def logit_normal(quantiles: torch.Tensor) -> torch.Tensor:
    """The logit-normal(0, 1) value at each quantile: `sigmoid(Phi^-1(q))`. Drawing the quantile
    uniformly is drawing from the distribution (SD3 paper, section 3.1)."""
    return torch.sigmoid(math.sqrt(2.0) * torch.erfinv(2.0 * quantiles - 1.0))


def shifted(sigmas: torch.Tensor, scheduler_config, image_tokens: int) -> torch.Tensor:
    """Noise levels shifted as the model's scheduler shifts its sampling steps."""
    if scheduler_config.get("use_dynamic_shifting", False):
        mu = _flux_mu(scheduler_config, image_tokens)
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    shift = float(scheduler_config.get("shift", 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def _flux_mu(config, image_tokens: int) -> float:
    """FLUX.1's resolution-dependent shift: linear in the image's token count."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return base + (top - base) * (image_tokens - base_len) / (max_len - base_len)


def noise_levels(timesteps: torch.Tensor, scheduler_config, image_tokens: int) -> torch.Tensor:
    """The sigma of each sample from its drawn timestep index in [0, num_train_timesteps): the
    index is read as a quantile of the logit-normal (so `--min_timestep`/`--max_timestep` cut
    the distribution's tails), then shifted."""
    count = scheduler_config.get("num_train_timesteps", 1000)
    quantiles = (timesteps.double() + 0.5) / count
    return shifted(logit_normal(quantiles), scheduler_config, image_tokens).float()


# ------------------------------------------------------------------------------- the transformer


def prediction_and_target(pipe, flow_model: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                          conditioning, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's velocity prediction for noised `latents` and the flow-matching target.

    `latents` come scaled by the VAE's `scaling_factor` (as for every family); the VAE's
    `shift_factor` is taken off here."""
    vae = pipe.vae.config
    latents = latents - vae.shift_factor * vae.scaling_factor
    height, width = latents.shape[-2:]
    image_tokens = (height // 2) * (width // 2)
    sigmas = noise_levels(timesteps.cpu(), pipe.scheduler.config, image_tokens).to(latents.device)
    noisy = (1.0 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
    hidden, pooled = conditioning
    if flow_model == "flux":
        prediction = flux_forward(pipe.transformer, noisy, sigmas, hidden, pooled, dtype)
    else:
        prediction = pipe.transformer(hidden_states=noisy.to(dtype), timestep=(sigmas * 1000).to(dtype),
                                      encoder_hidden_states=hidden.to(dtype), pooled_projections=pooled.to(dtype),
                                      return_dict=False)[0]
    return prediction, noise - latents


def flux_forward(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """FLUX.1's call: 2x2 patches in, positions for image and text tokens, guidance for dev."""
    batch, channels, height, width = noisy.shape
    packed = noisy.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
    image_ids = torch.zeros(height // 2, width // 2, 3, device=noisy.device)
    image_ids[..., 1] += torch.arange(height // 2, device=noisy.device)[:, None]
    image_ids[..., 2] += torch.arange(width // 2, device=noisy.device)[None, :]
    text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), FLUX_TRAINING_GUIDANCE, device=noisy.device, dtype=dtype)
    out = transformer(hidden_states=packed.to(dtype), timestep=sigmas.to(dtype), guidance=guidance,
                      pooled_projections=pooled.to(dtype), encoder_hidden_states=hidden.to(dtype),
                      txt_ids=text_ids.to(dtype), img_ids=image_ids.reshape(-1, 3).to(dtype), return_dict=False)[0]
    out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(batch, channels, height, width)
