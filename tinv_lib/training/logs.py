"""What a run reports: progress bar, A1111 loss CSV, scalars and preview images for the trackers
`--report_to` chooses (TensorBoard, Weights & Biases, both), and the scalars and CSV tables a task
adds (textual inversion's embedding diagnostics).

Only the main process writes. TensorBoard goes to `<output_dir>/logs` through torch's
`SummaryWriter`; wandb goes through accelerate's `WandBTracker` (project `--tracker_project_name`,
else `$WANDB_PROJECT`, else "tinv"; run name: the output folder's name; `$WANDB_DIR` defaults to
the output folder, so an offline run lands in `<output_dir>/wandb/`). The CSV keeps A1111's columns (`step, epoch, epoch_step, loss,
learn_rate`); on resume, rows after the resumed step (written before a kill) are dropped so the
file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

from tinv_lib.common.atomic import atomic_write_text

CSV_COLUMNS = ["step", "epoch", "epoch_step", "loss", "learn_rate"]
DEFAULT_PROJECT = "tinv"


def chosen_trackers(report_to: str) -> set[str]:
    """The trackers a `--report_to` value names: "all" is TensorBoard and wandb."""
    return {"tensorboard", "wandb"} if report_to == "all" else {report_to} - {"none"}


class RunLogger:
    """Progress, CSV and the chosen trackers for one run."""

    def __init__(self, output_dir: Path, kind: str, args, is_main: bool, steps_per_epoch: int,
                 resume_step: int | None = None):
        self.active = is_main
        self.steps_per_epoch = steps_per_epoch
        self.csv_every = args.log_csv_steps
        self.output_dir = output_dir
        self.resume_step = resume_step
        self.csv_path = output_dir / f"{kind}_loss.csv"
        self.tables_started: set[str] = set()
        self.writer = None
        self.wandb = None
        self.bar = None
        self.last_time = time.perf_counter()
        self.window: list[float] = []
        if not self.active:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.csv_path.is_file():
            _truncate_csv(self.csv_path, resume_step, len(CSV_COLUMNS))
        trackers = chosen_trackers(args.report_to)
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "logs"))
        if "wandb" in trackers:
            self.wandb = _start_wandb(output_dir, args)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=args.max_train_steps, initial=resume_step or 0, desc=kind, dynamic_ncols=True)

    def step(self, step: int, loss: float, rate: float, grad_norm: float, last: bool = False) -> None:
        """Record one optimizer step; the CSV gets a row every `--log_csv_steps` steps and at the
        `last` step of the run, so a run shorter than the interval still leaves one."""
        if not self.active:
            return
        now = time.perf_counter()
        speed = 1.0 / max(now - self.last_time, 1e-9)
        self.last_time = now
        self.window = (self.window + [loss])[-100:]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rate:.3g}")
        self._scalars(step, {"train/loss": loss, "train/lr": rate, "train/grad_norm": grad_norm,
                             "train/it_per_s": speed})
        if self.csv_every and (step % self.csv_every == 0 or last):
            new = not self.csv_path.is_file()
            with open(self.csv_path, "a", newline="") as handle:
                out = csv.writer(handle, lineterminator="\n")
                if new:
                    out.writerow(CSV_COLUMNS)
                epoch, epoch_step = divmod(step - 1, self.steps_per_epoch)
                out.writerow([step, epoch, epoch_step, f"{loss:.7f}", rate])

    def notice(self, text: str) -> None:
        """A notice on stderr, on a line of its own even while the progress bar is drawn."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars a task reports beside the loop's own (tag -> value), to every tracker."""
        if self.active:
            self._scalars(step, values)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb is not None and values:
            self.wandb.log({tag: float(value) for tag, value in values.items()}, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """Append a task's rows to the CSV `<output_dir>/<name>` (first column: the step). As for
        the loss CSV, a resumed run first drops the rows after the resumed step."""
        if not self.active:
            return
        path = self.output_dir / name
        if name not in self.tables_started:
            self.tables_started.add(name)
            if self.resume_step is not None and path.is_file():
                _truncate_csv(path, self.resume_step, len(columns))
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            out = csv.writer(handle, lineterminator="\n")
            if new:
                out.writerow(columns)
            out.writerows(rows)

    def images(self, step: int, pictures: list, prompt: str, seconds: float) -> None:
        """Log preview images to every tracker: TensorBoard's `preview/<index>` images and
        `preview/prompt` text; wandb's `preview` image list and `preview/prompt` text."""
        if not self.active or not pictures:
            return
        if self.writer is not None:
            import numpy as np

            for index, picture in enumerate(pictures):
                self.writer.add_image(f"preview/{index}", np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            self.writer.add_text("preview/prompt", prompt, step)
        if self.wandb is not None:
            self.wandb.log_images({"preview": [picture.convert("RGB") for picture in pictures]}, step=step)
            self.wandb.log({"preview/prompt": prompt}, step=step)

    def close(self) -> None:
        """Close the bar and the trackers; a second call does nothing."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(output_dir: Path, args):
    """accelerate's `WandBTracker`, started, with the run's flags as its config. wandb's own
    settings (`WANDB_MODE`, `WANDB_ENTITY`, ...) keep working; an explicit `WANDB_DIR` wins over
    the output folder."""
    from accelerate.tracking import WandBTracker

    project = getattr(args, "tracker_project_name", None) or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    # Given explicitly, read now: wandb reads its environment once per process, at its first run.
    folder = os.environ.get("WANDB_DIR") or str(output_dir)
    tracker = WandBTracker(project, name=output_dir.resolve().name, dir=folder)
    tracker.start()
    tracker.store_init_configuration({key: value if value is None or isinstance(value, (bool, int, float, str))
                                      else str(value) for key, value in vars(args).items()})
    return tracker


def _truncate_csv(path: Path, step: int, width: int) -> None:
    """Keep the header and the whole rows up to `step` of a CSV whose first column is the step."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    # A kill in the middle of an append leaves a short last row (or a step number cut to a
    # prefix): only whole rows up to the resumed step are kept.
    whole = [row for row in rows[1:] if len(row) == width and row[0].isdigit()]
    kept = [rows[0]] + [row for row in whole if int(row[0]) <= step]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(kept)
    atomic_write_text(path, buffer.getvalue())
