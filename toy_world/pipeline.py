"""The shipped toy models: where they live, how their parts become a pipeline folder.

`models/toy` is an ordinary diffusers `StableDiffusionPipeline` folder (safetensors weights, SD 1.x
PNDM scheduler config, no safety checker), so every loader of the project reads it like any SD 1.x
model; `models/toy-xl` a `StableDiffusionXLPipeline` one (`toy_world.xl`), `models/toy-flux` a
`FluxPipeline` one (`toy_world.flux`). The judge lives in
each folder's `judge/` subfolder, which diffusers ignores.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "toy"
XL_MODEL_DIR = DEFAULT_MODEL_DIR.with_name("toy-xl")
FLUX_MODEL_DIR = DEFAULT_MODEL_DIR.with_name("toy-flux")


def default_model_path() -> Path:
    """The committed toy model folder (the default model of `generate.py` and the README)."""
    return DEFAULT_MODEL_DIR


def sd1_scheduler():
    """SD 1.x's inference scheduler (PNDM, as in SD 1.5's folder) on the toy model's betas and v target."""
    from diffusers import PNDMScheduler

    from toy_world.diffusion import TOY_BETAS, TOY_PREDICTION

    return PNDMScheduler(**TOY_BETAS, prediction_type=TOY_PREDICTION, steps_offset=1, skip_prk_steps=True,
                         set_alpha_to_one=False)


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """The four trained parts as a StableDiffusionPipeline (CPU, float32, progress bar off)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd1_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path) -> Path:
    """Write the pipeline as a diffusers folder with safetensors weights."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_toy_pipeline(folder: str | Path | None = None):
    """Load a toy model (default: the committed SD 1.x one) for generation on the CPU, with the
    pipeline class its folder names."""
    from tinv_lib.models.architecture import of_folder

    folder = Path(folder or DEFAULT_MODEL_DIR)
    architecture = of_folder(folder)
    pipe = architecture.pipeline_class().from_pretrained(str(folder), **architecture.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    return pipe
