"""Preview images during training: the loop's preview stage and the files it writes.

The task draws (`TrainingTask.preview` returns PIL images, and may write files of its own such
as textual inversion's PNG embeddings); this module asks for them with the run's settings and
saves them under A1111's names. A preview that raises is reported once and previews stop: a
picture is never worth the training it would otherwise end.
"""

from __future__ import annotations

import time
from pathlib import Path

from tinv_lib.common.atomic import atomic_path
from tinv_lib.training.crash import preview_notice
from tinv_lib.training.saving import saved_weights
from tinv_lib.training.task import PreviewRequest, TrainingRun


def preview(run: TrainingRun, training_prompt: str) -> bool:
    """Preview images on the main process, with the VAE brought back if it was offloaded;
    whether previews should go on."""
    if not run.is_main:
        return True
    args, family = run.args, run.family
    if args.offload_vae:
        family.vae.to(family.unet.device)
    run.task.set_training(False)
    request = _request(run, training_prompt)
    try:
        started = time.perf_counter()
        with saved_weights(run):
            pictures = run.task.preview(family, request)
        save_previews(pictures, run.output_dir, run.task.name, run.step)
        run.logger.images(run.step, pictures, request.prompt, time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - any failure of a preview, see the module docstring
        run.logger.notice(preview_notice(error, run.step))
        return False
    finally:
        run.task.set_training(True)
        if args.offload_vae:
            family.vae.to("cpu")
    return True


def _request(run: TrainingRun, training_prompt: str) -> PreviewRequest:
    """`--validation_*` for this step; without a prompt, the step's own training prompt."""
    args = run.args
    return PreviewRequest(
        prompt=args.validation_prompt or training_prompt, negative=args.validation_negative_prompt,
        seed=args.validation_seed if args.validation_seed is not None else args.seed + run.step,
        steps=args.validation_num_inference_steps, cfg_scale=args.validation_guidance_scale,
        size=(args.resolution, args.resolution), count=args.num_validation_images,
        output_dir=run.output_dir, step=run.step)


def save_previews(pictures: list, output_dir: Path, name: str, step: int) -> None:
    """`images/<name>-<step>.png` (A1111's preview names; `-1`, `-2` for further images)."""
    for index, picture in enumerate(pictures):
        target = output_dir / "images" / f"{name}-{step}{'' if index == 0 else f'-{index}'}.png"
        with atomic_path(target) as tmp:
            picture.save(tmp, format="PNG")
