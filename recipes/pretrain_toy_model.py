#!/usr/bin/env python
"""Pretrain the toy world's SD-1.x-layout model and its judge from scratch (README "Toy world"),
or the SDXL- or FLUX.1-layout one on the SD 1.x model's VAE and judge.

    python recipes/pretrain_toy_model.py            # the committed models/toy; 49 min on 2 CPU cores
    python recipes/pretrain_toy_model.py --architecture sdxl     # the committed models/toy-xl
    python recipes/pretrain_toy_model.py --architecture flux     # the committed models/toy-flux
    python recipes/pretrain_toy_model.py --quick --output_dir /tmp/toy   # every stage in seconds

Deterministic from --seed on a given machine and thread count. Writes a diffusers folder with
the judge in `judge/` and `training_report.json` (settings, wall and CPU time per stage, judge
accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as a script, before torch loads; importing this module changes nothing
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning thread
    # starves its partner and a 2-thread run becomes slower than a 1-thread one.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's toy_world

from toy_world.pipeline import FLUX_MODEL_DIR, XL_MODEL_DIR  # noqa: E402
from toy_world.recipe import RecipeConfig, quick_config, run_recipe  # noqa: E402

# Each architecture's model folder and VAE/latent cache.
FOLDERS = {
    "sd1": (RecipeConfig().output_dir, RecipeConfig().work_dir),
    "sdxl": (XL_MODEL_DIR, Path("runs/toy_xl_pretrain")),
    "flux": (FLUX_MODEL_DIR, Path("runs/toy_flux_pretrain")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = RecipeConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=tuple(FOLDERS), default=defaults.architecture,
                        help="sdxl: two text encoders, pooled text and size ids; flux: CLIP-L's pooled text, T5 and "
                             "a flow-matching transformer; both on --base_model's VAE and judge")
    parser.add_argument("--base_model", type=Path, default=defaults.base_model,
                        help="sdxl, flux: the SD 1.x toy model whose VAE and judge it uses")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="model folder to write (default: " + ", ".join(f"{folder} for {arch}"
                                                                       for arch, (folder, _) in FOLDERS.items()) + ")")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="VAE/latent cache between runs (default: " + ", ".join(
                            str(work) for _, work in FOLDERS.values()) + ")")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads and drawing processes")
    parser.add_argument("--diffusion_processes", type=int, default=defaults.diffusion_processes,
                        help="processes that share each diffusion batch, splitting the threads (gloo)")
    parser.add_argument("--num_images", type=int, default=defaults.num_images, help="procedural training images")
    parser.add_argument("--vae_steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--diffusion_steps", type=int, default=defaults.diffusion.steps)
    parser.add_argument("--batch_size", type=int, default=defaults.diffusion.batch_size, help="diffusion batch size")
    parser.add_argument("--learning_rate", type=float, default=defaults.diffusion.lr, help="diffusion learning rate")
    parser.add_argument("--mid_noise_share", type=float, default=defaults.diffusion.mid_noise_share,
                        help="share of diffusion timesteps drawn around mid noise (the committed model: 0)")
    parser.add_argument("--judge_steps", type=int, default=defaults.judge_steps)
    parser.add_argument("--quick", action="store_true", help="tiny numbers for every stage (smoke test)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    defaults = RecipeConfig()
    folder, work = FOLDERS[args.architecture]
    output_dir = args.output_dir or folder
    work_dir = args.work_dir or work
    shared = {"architecture": args.architecture, "base_model": args.base_model, "seed": args.seed,
              "threads": args.threads, "diffusion_processes": args.diffusion_processes}
    if args.quick:
        return dataclasses.replace(quick_config(output_dir, work_dir), **shared)
    return dataclasses.replace(
        defaults, output_dir=output_dir, work_dir=work_dir, **shared,
        num_images=args.num_images, vae_steps=args.vae_steps, judge_steps=args.judge_steps,
        diffusion=dataclasses.replace(
            defaults.diffusion, steps=args.diffusion_steps, batch_size=args.batch_size, lr=args.learning_rate,
            mid_noise_share=args.mid_noise_share, seed=args.seed,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    run_recipe(config_from_args(args), log=lambda m: print(f"[{time.time() - started:7.1f}s] {m}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
