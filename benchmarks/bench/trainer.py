"""Our trainer as the benchmark runs it, and the pair of it and its floor.

`Trainer` runs the real training core (`tinv_lib.training.loop.train`) with the trainer's own
arguments and task, one whole run per round (model loading and latent caching included), and
watches it only through the loop's `TrainingHooks`: `on_start` hands over the optimizer the loop
built, `on_step` times the steps. `_OptionsTask` wraps the real task to apply the variant's UNet
options before its set-up and to meter gradients. `Pair` puts a trainer and its floor in one
process and steps them in turn (see `PairClock`), so load from other jobs hits both alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench.floor import Floor
from benchmarks.bench.jobs import FLOOR_OF, PLACEHOLDER, Job, device, quiet
from benchmarks.bench.meters import (
    GradMeter,
    PairClock,
    StepClock,
    alone_result,
    byte_counts,
    frozen_grad_bytes,
    memory_reset,
)
from benchmarks.bench.variants import Options, apply_unet_options


class _OptionsTask:
    """A `TrainingTask` that applies the benchmark's UNet options before the real task's
    set-up (so a hypernetwork wraps the chosen attention processor) and meters gradients.

    For a hypernetwork it also fills the task's prompt cache before step 1. The task encodes
    each distinct prompt once, at first use, and reuses it; a run of thousands of steps pays
    that once per prompt (e.g. 26 template lines x 8 images = 208 encodes), but a 20-step
    timing window would be dominated by it. The fill is timed and reported on its own, and the
    steps are then timed in the steady state the run spends nearly all its time in; the floor
    likewise encodes its prompts before timing.
    """

    def __init__(self, task, options: Options) -> None:
        self._task, self._options = task, options
        self.prompt_cache_seconds: float | None = None
        self.prompt_cache_size = 0

    def setup(self, family, model_info, args, device):
        apply_unet_options(family.unet, self._options)
        step = self._task.setup(family, model_info, args, device)
        self.grads = GradMeter(self._task.parameters())
        return step

    def check_prompts(self, prompts: list[str]) -> None:
        self._task.check_prompts(prompts)
        if self._task.kind == "hypernetwork":
            started = time.perf_counter()
            distinct = list(dict.fromkeys(prompts))
            for prompt in distinct:
                self._task.conditioning([prompt])
            self.prompt_cache_seconds, self.prompt_cache_size = time.perf_counter() - started, len(distinct)

    def __getattr__(self, name: str):
        return getattr(self._task, name)


class Trainer:
    """Our real trainer: `train()` of the training core with the trainer's own arguments and
    task, one whole run (model loading and latent caching included) per round."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.device = device()
        self.optimizer = None  # the last run's, as the loop built it (seen by the `on_start` hook)
        self.runs = 0

    def _argv(self, output: Path) -> list[str]:
        job = self.job
        argv = [
            "--pretrained_model_name_or_path", job.model, "--train_data_dir", job.data, "--output_dir", str(output),
            "--resolution", str(job.resolution), "--train_batch_size", str(job.batch),
            "--max_train_steps", str(job.warmup + job.steps), "--seed", str(job.seed),
            "--mixed_precision", job.options.mixed_precision,
            "--checkpointing_steps", "0", "--save_steps", "0", "--validation_steps", "0",
        ]
        if job.options.gradient_checkpointing:
            argv.append("--gradient_checkpointing")
        if job.options.use_8bit_adam:
            argv.append("--use_8bit_adam")
        if job.task == "ti":
            return argv + ["--placeholder_token", PLACEHOLDER, "--num_vectors", str(job.num_vectors)]
        return argv + ["--hypernetwork_name", PLACEHOLDER]

    def run(self, on_step: Callable[[int], None]) -> _OptionsTask:
        """One training run with `on_step` called with each step reached; returns the task."""
        from tinv_lib.training.loop import train
        from tinv_lib.training.runner import prepare_process
        from tinv_lib.training.task import TrainingHooks

        if self.job.task == "ti":
            from tinv_lib.training.textual_inversion import TextualInversionTask as Task
            from tinv_lib.training.textual_inversion import parse_args
        else:
            from tinv_lib.training.hypernetwork import HypernetworkTask as Task
            from tinv_lib.training.hypernetwork import parse_args
        self.runs += 1
        output = Path(self.job.workdir) / f"out-{self.job.task}-{os.getpid()}-{self.runs}"
        args = parse_args(self._argv(output))
        task = _OptionsTask(Task(args), self.job.options)
        prepare_process()
        with quiet():
            code = train(args, task, TrainingHooks(on_start=self._started, on_step=lambda report: on_step(report.step)))
        if code != 0:
            raise RuntimeError(f"{self.job.task}: training ended with exit code {code}")
        return task

    def _started(self, run) -> None:
        # The loop hands out the optimizer accelerate wrapped; its state is the inner one's.
        self.optimizer = getattr(run.optimizer, "optimizer", run.optimizer)

    def round(self) -> dict:
        """A run by itself: for memory and bytes."""
        clock = StepClock(self.job.warmup, self.device)
        memory_reset(self.device)
        task = self.run(clock)
        family = task.family
        frozen = frozen_grad_bytes([family.unet, family.vae, *family.text_encoders])
        result = alone_result(clock, self.device, self.optimizer, task.parameters(), task.grads, frozen)
        return {**result, "startup_s": clock.warm_seconds}


class Pair:
    """Our trainer and its floor in one process, stepping in turn (see `PairClock`)."""

    def __init__(self, job: Job) -> None:
        self.job, self.device = job, device()
        self.floor = Floor(job, hypernetwork=job.task == "hn")
        self.trainer = Trainer(job)

    def round(self) -> dict:
        clock = PairClock(self.floor, self.job.warmup, self.device)
        task = self.trainer.run(clock)
        floor_frozen = frozen_grad_bytes(self.floor.frozen_modules())
        ours_frozen = frozen_grad_bytes([task.family.unet, task.family.vae, *task.family.text_encoders])
        return {
            "ours": clock.ours, "floor": clock.floors,
            "bytes": {FLOOR_OF[self.job.task]: byte_counts(self.floor.optimizer, self.floor.params, self.floor.grads,
                                                           floor_frozen),
                      self.job.task: byte_counts(self.trainer.optimizer, task.parameters(), task.grads, ours_frozen)},
            "prompt_cache": None if task.prompt_cache_seconds is None else
            {"prompts": task.prompt_cache_size, "seconds": task.prompt_cache_seconds},
        }
