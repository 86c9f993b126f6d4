"""A validation loss: the denoising loss of held-out images at fixed noise and timesteps.

The training loss jumps with each step's random timestep and noise, so it cannot say whether
the last 500 steps still helped or started to overfit. Here every held-out image is noised at
the same `TIMESTEPS_PER_IMAGE` evenly spaced timesteps with the same noise at every evaluation,
in every run (the noise does not depend on `--seed`), and its prompt is the first template line
with its caption: the number moves only when the trainables do, and two runs can be compared
step for step. It is the plain (unweighted by min-SNR) mean squared error, so runs with
different loss options stay comparable too.
"""

from __future__ import annotations

import random

import torch

from tinv_lib.training.batches import MicroBatch
from tinv_lib.training.data import Stream, TrainingImage, build_prompt, seeded

TIMESTEPS_PER_IMAGE = 4
NOISE_SEED = 0  # the validation noise is the same for every run


def split_off(images: list[TrainingImage], share: float, seed: int) -> tuple[list[TrainingImage], list[TrainingImage]]:
    """(training images, held-out images): `share` of them, at least one, chosen by the seed."""
    count = max(1, round(share * len(images)))
    if count >= len(images):
        from tinv_lib.training.data import DatasetError

        raise DatasetError(f"--validation_split {share} would hold out all {len(images)} images: lower it")
    held = set(random.Random(seeded(seed, Stream.VALIDATION_SPLIT)).sample(range(len(images)), count))
    return [im for i, im in enumerate(images) if i not in held], [im for i, im in enumerate(images) if i in held]


def validation_batches(images: list[TrainingImage], template: str, name: str, num_train_timesteps: int,
                       latent_scale: float) -> list[MicroBatch]:
    """One batch per held-out image: its posterior mean at each fixed timestep with fixed noise."""
    spacing = num_train_timesteps / TIMESTEPS_PER_IMAGE
    timesteps = torch.tensor([int((r + 0.5) * spacing) for r in range(TIMESTEPS_PER_IMAGE)])
    batches = []
    for index, image in enumerate(images):
        mean = image.latents[False][0]
        generator = torch.Generator().manual_seed(seeded(NOISE_SEED, Stream.VALIDATION, index))
        noise = torch.randn((TIMESTEPS_PER_IMAGE, *mean.shape), generator=generator)
        weight = image.weight if image.weight is not None else torch.ones(mean.shape[1:])
        prompt = build_prompt(template, image.caption, name, random.Random(0), False, 0.0)
        batches.append(MicroBatch(
            latents=(mean * latent_scale).expand(TIMESTEPS_PER_IMAGE, *mean.shape).clone(), noise=noise,
            timesteps=timesteps.clone(), prompts=[prompt] * TIMESTEPS_PER_IMAGE,
            weights=weight.expand(TIMESTEPS_PER_IMAGE, *weight.shape).clone(), sizes=[image.size] * TIMESTEPS_PER_IMAGE))
    return batches
