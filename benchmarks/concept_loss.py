"""The denoising loss of a concept's training images under several prompts, per timestep quarter.

Tells whether a textual-inversion embedding that fails stopped short of what the model can do
(its loss above the loss the words reach) or whether the loss does not reward the concept (the
words no better). Diffusers' own pipeline loads the embedding, so multi-vector files expand as in
use; the noise and timesteps are the same for every prompt, and the loss is the trainer's own
(`tinv_lib.training.objective.denoising_loss`: v- or eps-prediction, as the model says).

    python benchmarks/concept_loss.py toy-s01 DATA_DIR EMBEDDING.safetensors \
        "a photo of an orange square on a checkered cyan background" "a photo of toy-s01"
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: set up before torch loads (benchmarks/_setup.py says why)
    import _setup

    _setup.prepare_script(HF_HUB_OFFLINE="1")

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

MODEL = Path(__file__).resolve().parents[1] / "models" / "toy"
QUARTERS = ((0, 250), (250, 500), (500, 750), (750, 1000))
DRAWS = 24  # noise draws per quarter, each over every image


def latents_of(pipe, data: Path) -> torch.Tensor:
    files = [p for p in sorted(data.glob("*.png")) if not p.stem.endswith("-masklabel")]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in files])
    return pipe.vae.encode(torch.tensor(pixels).permute(0, 3, 1, 2)).latent_dist.mean * pipe.vae.config.scaling_factor


def quarter_losses(pipe, latents: torch.Tensor, prompt: str) -> list[float]:
    """The training loss (`objective.denoising_loss`) of `prompt`, per timestep quarter."""
    from tinv_lib.models.family import family_of
    from tinv_lib.training.objective import denoising_loss

    ids = pipe.tokenizer([pipe.maybe_convert_prompt(prompt, pipe.tokenizer)], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    context = pipe.text_encoder(ids)[0].expand(len(latents), -1, -1)
    family, scheduler, losses = family_of(pipe), pipe.scheduler, []
    sizes = [(latents.shape[-1], latents.shape[-2])] * len(latents)  # unused by SD1/SD2 UNets
    for low, high in QUARTERS:
        generator = torch.Generator().manual_seed(low)
        draws = []
        for _ in range(DRAWS):
            t = torch.randint(low, high, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            loss = denoising_loss(family, scheduler, latents, noise, t, (context, None), sizes, pipe.unet.dtype)
            draws.append(float(loss))
        losses.append(float(np.mean(draws)))
    return losses


def main(argv: list[str]) -> int:
    name, data, embedding, *prompts = argv
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # add_noise and get_velocity
    pipe.load_textual_inversion(embedding, token=name)
    with torch.no_grad():
        latents = latents_of(pipe, Path(data))
        print(f"{'prompt':<64} " + " ".join(f"t {lo}-{hi}" for lo, hi in QUARTERS) + "   mean")
        for prompt in prompts:
            losses = quarter_losses(pipe, latents, prompt)
            print(f"{prompt[:64]:<64} " + " ".join(f"{v:9.4f}" for v in losses) + f"  {np.mean(losses):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
