"""One micro-batch of training samples, every random choice drawn from a named stream.

Each random choice of a run (the prompt template, the flip, the noise, the timestep, the latent
sample) comes from its own generator, seeded from the run seed, the stream and the position of
the sample in the run (`seeded`). Nothing depends on what was drawn before, on how many
processes share the batch or on where a run was resumed, so a resumed run and a run on another
number of processes see exactly the samples an uninterrupted run sees.

The stream numbers (`data.Stream`) are part of what a seed means: changing one changes every
run's samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tinv_lib.training.data import Stream, TrainingImage, build_prompt, sample_latent, seeded


@dataclass
class MicroBatch:
    """The samples of one process for one micro-batch, on the CPU."""

    latents: torch.Tensor  # scaled by the model's latent scale
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor  # per-pixel loss weights (masks, alpha), ones when there are none
    sizes: list[tuple[int, int]]  # (width, height) of each image, for SDXL's size conditioning


@dataclass
class SampleSettings:
    """What the samples depend on besides the image: the flags and the model's constants."""

    seed: int
    templates: list[str]
    name: str  # the `[name]` of the templates
    shuffle_tags: bool
    tag_dropout: float
    flip_p: float
    latent_sampling: str
    latent_scale: float
    timesteps: tuple[int, int]  # timesteps are drawn from [first, last) (`--min_timestep`, `--max_timestep`)
    noise_offset: float = 0.0  # `--noise_offset`: a random constant per sample and channel added to the noise
    caption_dropout: float = 0.0  # `--caption_dropout`: probability that `[filewords]` is left empty


def seed_torch_for(settings: SampleSettings, micro_index: int, rank: int) -> None:
    """Seed torch's global generator (module dropout) as a function of the micro-batch and rank."""
    torch.manual_seed(seeded(settings.seed, Stream.TORCH_GLOBAL, micro_index, rank))


def build_micro_batch(
    images: list[TrainingImage], members: list[tuple[int, int]], micro_index: int, settings: SampleSettings
) -> MicroBatch:
    """The samples for `members`, pairs of (position in the global batch, image index)."""
    samples = [_sample(images[index], index, position, micro_index, settings) for position, index in members]
    latents, noise, timesteps, prompts, weights = zip(*samples)
    return MicroBatch(torch.stack(latents), torch.stack(noise), torch.cat(timesteps), list(prompts),
                      torch.stack(weights), [images[index].size for _, index in members])


def _sample(image: TrainingImage, index: int, position: int, k: int, settings: SampleSettings):
    s = settings
    text_rng = random.Random(seeded(s.seed, Stream.PROMPT, k, position))
    caption = "" if _drops_caption(s, k, position) else image.caption
    prompt = build_prompt(text_rng.choice(s.templates), caption, s.name, text_rng, s.shuffle_tags, s.tag_dropout)
    flip = random.Random(seeded(s.seed, Stream.FLIP, k, position)).random() < s.flip_p
    mean, std = image.latents[flip]
    once = torch.randn(mean.shape, generator=_generator(s.seed, Stream.LATENT_ONCE, index, int(flip)))
    fresh = torch.randn(mean.shape, generator=_generator(s.seed, Stream.LATENT_FRESH, k, position))
    latent = sample_latent(mean, std, s.latent_sampling, once, fresh) * s.latent_scale
    generator = _generator(s.seed, Stream.NOISE_AND_TIMESTEP, k, position)
    noise = torch.randn(mean.shape, generator=generator)
    timestep = torch.randint(*s.timesteps, (1,), generator=generator)
    if s.noise_offset:
        offset = torch.randn((mean.shape[0], 1, 1), generator=_generator(s.seed, Stream.NOISE_OFFSET, k, position))
        noise = noise + s.noise_offset * offset
    weight = image.weight.flip(-1) if (image.weight is not None and flip) else image.weight
    return latent, noise, timestep, prompt, weight if weight is not None else torch.ones(mean.shape[1:])


def _drops_caption(settings: SampleSettings, k: int, position: int) -> bool:
    """Whole-caption dropout (kohya's `caption_dropout_rate`): the template's `[name]` stays."""
    if not settings.caption_dropout:
        return False
    return random.Random(seeded(settings.seed, Stream.CAPTION_DROPOUT, k, position)).random() < settings.caption_dropout


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(seeded(*parts))
