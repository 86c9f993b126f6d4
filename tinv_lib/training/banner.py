"""The start of a run, as the user and a later bug report see it: the settings file, the data
notices, what resuming did, and one line about the run."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from tinv_lib.common.atomic import atomic_write_text
from tinv_lib.training.task import TrainingRun


def announce(run: TrainingRun, messages: list[str], file_step: int, checkpoint: Path | None) -> None:
    """`settings-<date>.json` (every flag and what the run found), then the lines on screen."""
    args, task, accelerator = run.args, run.task, run.accelerator
    run.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "model_hash": run.model_info.short_hash, "model_name": run.model_info.name,
                "model_architecture": run.model_info.arch, "num_of_dataset_images": len(run.images),
                "initial_step": run.step, "num_processes": accelerator.num_processes,
                "mixed_precision": accelerator.mixed_precision}
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    atomic_write_text(run.output_dir / f"settings-{stamp}.json", json.dumps(settings, indent=1, default=str))
    for line in messages:
        run.logger.notice(line)
    if task.resumed_from is not None:
        print(f"resumed from {task.resumed_from} at step {file_step}")
    if checkpoint is not None:
        print(f"resumed from {checkpoint} at step {run.step}")
    elif args.resume_from_checkpoint:
        print(f"no checkpoint in {run.output_dir}: starting at step {run.step}")
    for line in run.schedule.describe():
        print(line)
    print(f"***** {task.kind}: {run.plan.describe()}, "
          f"batch {run.batch} x {accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation, "
          f"steps {run.step} -> {run.end_step}, {accelerator.mixed_precision} precision on {run.device} *****")
