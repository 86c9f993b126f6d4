"""The toy model's whole pretraining run: data, VAE, judge, text encoder(s) + UNet, report.

`architecture` "sd1" trains everything (`models/toy`); "sdxl" (`models/toy-xl`, `toy_world.xl`)
and "flux" (`models/toy-flux`, `toy_world.flux`) take the VAE and judge of `base_model` and train
only their own text encoders and UNet or transformer.

Deterministic from one seed. Stages run in order; the VAE stage's result (weights and cached
latents) is kept in `work_dir`, keyed by the settings that produced it, so a rerun that only
changes later settings starts at the diffusion stage. The final folder is written to a temporary
sibling and renamed into place, so an interrupted run never leaves half a model.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tinv_lib.common.atomic import atomic_write_bytes
from tinv_lib.common.torch_files import safe_torch_load
from toy_world import autoencoder, diffusion, flux, judge, xl
from toy_world.data import draw_images, make_scenes
from toy_world.pipeline import DEFAULT_MODEL_DIR, assemble_pipeline, save_pipeline
from toy_world.scoring import JUDGE_SUBFOLDER

REPORT_NAME = "training_report.json"


@dataclass
class RecipeConfig:
    """Every setting of the run; the defaults are the committed model's."""

    output_dir: Path = DEFAULT_MODEL_DIR
    work_dir: Path = Path("runs/toy_pretrain")
    architecture: str = "sd1"  # or "sdxl", "flux"
    base_model: Path = DEFAULT_MODEL_DIR  # sdxl, flux: the VAE and judge come from here
    seed: int = 0
    threads: int = 2
    diffusion_processes: int = 2
    num_images: int = 16000
    outline_probability: float = 0.2
    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    diffusion: diffusion.DiffusionTraining = field(default_factory=diffusion.DiffusionTraining)
    judge_steps: int = 500
    judge_reconstructions: int = 4000
    judge_test_images: int = 1000
    checkpoint_every: int = 500


def quick_config(output_dir: Path, work_dir: Path) -> RecipeConfig:
    """A seconds-long run of every stage, for tests: same code, tiny numbers, useless model."""
    return RecipeConfig(
        output_dir=output_dir, work_dir=work_dir, num_images=96, vae_steps=2, vae_batch_size=4,
        diffusion=diffusion.DiffusionTraining(steps=2, batch_size=4, warmup=1),
        judge_steps=2, judge_reconstructions=16, judge_test_images=32,
    )


class Clock:
    """Wall and CPU seconds per stage, for the report."""

    def __init__(self) -> None:
        self.start = time.time()
        self.stages: dict[str, dict[str, float]] = {}

    def stage(self, name: str, wall: float, cpu: float) -> None:
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _vae_key(cfg: RecipeConfig) -> dict:
    """The settings the VAE stage depends on (its cache is reused only when they match)."""
    return {
        "seed": cfg.seed, "num_images": cfg.num_images, "outline_probability": cfg.outline_probability,
        "vae_steps": cfg.vae_steps, "vae_batch_size": cfg.vae_batch_size, "vae_lr": cfg.vae_lr,
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in autoencoder.VAE_CONFIG.items()},
    }


def vae_stage(cfg: RecipeConfig, images: np.ndarray, log: Callable[[str], None]):
    """Train (or reuse) the VAE; return it with its scaling factor set, the scaled latents, timings."""
    folder = cfg.work_dir / "vae"
    key = _vae_key(cfg)
    key_file = folder / "recipe_key.json"
    if key_file.is_file() and json.loads(key_file.read_text())["key"] == key:
        from diffusers import AutoencoderKL

        log(f"reusing the VAE in {folder}")
        saved = json.loads(key_file.read_text())
        return AutoencoderKL.from_pretrained(str(folder)), safe_torch_load(folder / "latents.pt"), saved["timing"]
    wall, cpu = time.time(), cpu_seconds()
    torch.manual_seed(cfg.seed)
    vae = autoencoder.build_vae()
    autoencoder.train_vae(
        vae, images, cfg.vae_steps, cfg.vae_batch_size, cfg.vae_lr, cfg.seed,
        log=lambda step, mse: log(f"vae step {step}/{cfg.vae_steps} mse {mse:.5f}"),
    )
    latents = autoencoder.encode_latents(vae, images)
    scale = autoencoder.measure_scaling_factor(latents)
    vae.register_to_config(scaling_factor=scale)
    log(f"vae done; latent scaling factor {scale}")
    timing = {"wall_s": round(time.time() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}
    vae.save_pretrained(str(folder), safe_serialization=True)
    torch.save(latents * scale, folder / "latents.pt")
    atomic_write_bytes(key_file, json.dumps({"key": key, "timing": timing}).encode())
    return vae, latents * scale, timing


def base_vae_stage(cfg: RecipeConfig, images: np.ndarray, log: Callable[[str], None]):
    """The base model's VAE and the scaled latents of `images` through it, with timings."""
    from diffusers import AutoencoderKL

    wall, cpu = time.time(), cpu_seconds()
    vae = AutoencoderKL.from_pretrained(str(cfg.base_model / "vae"))
    latents = autoencoder.encode_latents(vae, images) * vae.config.scaling_factor
    log(f"encoded {len(images)} images with the VAE of {cfg.base_model}")
    return vae, latents, {"wall_s": round(time.time() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}


def base_judge_stage(cfg: RecipeConfig):
    """The base model's judge and the accuracy report it was saved with."""
    folder = cfg.base_model / JUDGE_SUBFOLDER
    return judge.load_judge(folder), json.loads((folder / judge.CONFIG_NAME).read_text())["accuracy"]


def build_text_side_and_unet(cfg: RecipeConfig):
    """Tokenizer(s), text encoder(s) and UNet (FLUX.1: transformer) of `cfg.architecture`, fresh
    from the seed."""
    from testing.tokenizer_build import build_clip_tokenizer

    if cfg.architecture == "flux":
        tokenizers = flux.build_tokenizers(cfg.work_dir)
        torch.manual_seed(cfg.seed + 1)
        return flux.FluxText(tokenizers, flux.build_text_encoders(*tokenizers)), flux.build_transformer()
    tokenizer = build_clip_tokenizer(cfg.work_dir / "tokenizer")
    if cfg.architecture == "sdxl":
        tokenizer_2 = build_clip_tokenizer(cfg.work_dir / "tokenizer_2", pad_token="!")
        torch.manual_seed(cfg.seed + 1)
        return xl.XlText([tokenizer, tokenizer_2], xl.build_text_encoders(tokenizer, tokenizer_2)), xl.build_unet()
    torch.manual_seed(cfg.seed + 1)
    text_encoder = diffusion.build_text_encoder(tokenizer)
    return diffusion.Sd1Text(tokenizer, text_encoder), diffusion.build_unet()


def assemble(cfg: RecipeConfig, vae, unet, text_encoders: list, tokenizers: list):
    """The trained parts as the pipeline of `cfg.architecture`."""
    if cfg.architecture == "sdxl":
        return xl.assemble_xl_pipeline(vae, text_encoders, tokenizers, unet)
    if cfg.architecture == "flux":
        return flux.assemble_flux_pipeline(vae, text_encoders, tokenizers, unet)
    return assemble_pipeline(vae, text_encoders[0], tokenizers[0], unet)


def diffusion_stage(cfg: RecipeConfig, vae, scenes, latents: torch.Tensor, log: Callable[[str], None]):
    """Build the text side and UNet from the seed and train them jointly; the EMA pipeline.

    Every `checkpoint_every` steps the EMA model is saved to `work_dir/checkpoint` as a
    pipeline folder, so a long run can be watched (and judged) while it trains.
    """
    text, unet = build_text_side_and_unet(cfg)
    started = time.time()

    def report(step: int, loss: float) -> None:
        rate = step / max(time.time() - started, 1e-6)
        log(f"diffusion step {step}/{cfg.diffusion.steps} loss {loss:.4f} ({rate:.2f} steps/s)")

    def checkpoint(step: int, ema_unet, ema_text_encoders) -> None:
        save_pipeline(assemble(cfg, vae, ema_unet, ema_text_encoders, text.tokenizers), cfg.work_dir / "checkpoint")
        log(f"checkpoint at step {step} in {cfg.work_dir / 'checkpoint'}")

    unet, text_encoders = diffusion.train_diffusion(
        unet, text, latents, scenes, cfg.diffusion, report, checkpoint, cfg.checkpoint_every,
        processes=cfg.diffusion_processes,
        objective=diffusion.Objective(flux.flow_loss, flux.build_scheduler) if cfg.architecture == "flux" else None,
    )
    return assemble(cfg, vae, unet, text_encoders, text.tokenizers)


def judge_stage(cfg: RecipeConfig, vae, images: np.ndarray, scenes, latents: torch.Tensor, log):
    """Train the judge on drawn images and VAE reconstructions; measure it on fresh images."""
    count = min(cfg.judge_reconstructions, len(images))
    reconstructions = autoencoder.decode_latents(vae, latents[:count] / vae.config.scaling_factor)
    net = judge.train_judge(
        images, scenes, cfg.judge_steps, reconstructions=reconstructions, seed=cfg.seed,
        log=lambda step, loss: log(f"judge step {step}/{cfg.judge_steps} loss {loss:.4f}"),
    )
    test_scenes = make_scenes(cfg.seed + 1_000_000, cfg.judge_test_images, cfg.outline_probability)
    test_images = draw_images(test_scenes, workers=cfg.threads)
    clean = judge.accuracy(net, test_images, test_scenes)
    test_recon = autoencoder.decode_latents(vae, autoencoder.encode_latents(vae, test_images))
    through_vae = judge.accuracy(net, test_recon, test_scenes)
    report = {"held_out_images": len(test_scenes), "clean": clean, "vae_reconstructed": through_vae}
    log(f"judge accuracy on {len(test_scenes)} fresh images: " + ", ".join(f"{k} {v:.4f}" for k, v in clean.items()))
    log("judge accuracy through the VAE: " + ", ".join(f"{k} {v:.4f}" for k, v in through_vae.items()))
    judge.save_judge(net, cfg.work_dir / JUDGE_SUBFOLDER, report)
    return net, report


def run_recipe(cfg: RecipeConfig, log: Callable[[str], None] = print) -> dict:
    """Run every stage and write the model folder (with `judge/` and the report); return the report."""
    torch.set_num_threads(cfg.threads)
    clock = Clock()
    wall, cpu = time.time(), cpu_seconds()
    scenes = make_scenes(cfg.seed, cfg.num_images, cfg.outline_probability)
    images = draw_images(scenes, workers=cfg.threads)
    clock.stage("data", time.time() - wall, cpu_seconds() - cpu)
    log(f"drew {len(images)} images in {time.time() - wall:.0f}s")

    if cfg.architecture != "sd1":
        vae, latents, clock.stages["vae"] = base_vae_stage(cfg, images, log)
        net, judge_report = base_judge_stage(cfg)
    else:
        vae, latents, clock.stages["vae"] = vae_stage(cfg, images, log)
        wall, cpu = time.time(), cpu_seconds()
        net, judge_report = judge_stage(cfg, vae, images, scenes, latents, log)
        clock.stage("judge", time.time() - wall, cpu_seconds() - cpu)

    wall, cpu = time.time(), cpu_seconds()
    pipe = diffusion_stage(cfg, vae, scenes, latents, log)
    clock.stage("diffusion", time.time() - wall, cpu_seconds() - cpu)

    staging = cfg.output_dir.with_name(cfg.output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(pipe, staging)
    judge.save_judge(net, staging / JUDGE_SUBFOLDER, judge_report)
    report = {
        "config": _jsonable(asdict(replace(cfg))),
        "timing": {"stages": clock.stages,
                   "total_wall_s": round(sum(s["wall_s"] for s in clock.stages.values()), 1),
                   "total_cpu_s": round(sum(s["cpu_s"] for s in clock.stages.values()), 1),
                   "threads": cfg.threads, "torch": torch.__version__},
        "judge": judge_report,
    }
    atomic_write_bytes(staging / REPORT_NAME, json.dumps(report, indent=1).encode("utf-8"))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    staging.rename(cfg.output_dir)
    log(f"wrote {cfg.output_dir}; total wall {report['timing']['total_wall_s']}s, "
        f"CPU {report['timing']['total_cpu_s']}s")
    return report


def _jsonable(value):
    """Paths as strings, tuples as lists, recursively (for the JSON report)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
