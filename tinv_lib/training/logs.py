"""What a run reports: progress bar, A1111 loss CSV, scalars and preview images for the trackers
`--report_to` chooses (TensorBoard, Weights & Biases, both), and the scalars and CSV tables a task
adds (textual inversion's embedding diagnostics).

Only the main process writes. TensorBoard goes to `<output_dir>/logs` through torch's
`SummaryWriter`; wandb goes through accelerate's `WandBTracker` (project `--tracker_project_name`,
else `$WANDB_PROJECT`, else "tinv"; run name: the output folder's name; `$WANDB_DIR` defaults to
the output folder, so an offline run lands in `<output_dir>/wandb/`). The CSV keeps A1111's columns (`step, epoch, epoch_step, loss,
learn_rate`); on resume, rows after the resumed step (written before a kill) are dropped so the
file reads as one uninterrupted run.

Lines of text start on a line of their own, in a terminal and in a log file (`> train.log 2>&1`,
`nohup`, cloud logs). The bar appears at the first step, after the run's opening lines, and
closes (ending its line) at the last one, before the final files are reported. In a terminal,
notices go through `tqdm.write`; elsewhere the bar's `\r` frames pile up on one line, so a notice
first ends that line, and anything printed to the (block-buffered) stdout is flushed before the
bar draws, so it lands in the file in the order it was printed.
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
                 resume_step: int | None = None, started: float | None = None):
        """`started`: the `time.perf_counter()` the run began at, for the closing line's time
        (default: now)."""
        self.active = is_main
        self.kind = kind
        self.steps_per_epoch = steps_per_epoch
        self.csv_every = args.log_csv_steps
        self.output_dir = output_dir
        self.resume_step = resume_step
        self.csv_path = output_dir / f"{kind}_loss.csv"
        self.tables_started: set[str] = set()
        self.writer = None
        self.wandb = None
        self.bar = None
        self.bar_stream: _BarStream | None = None
        self.total_steps, self.resumed_at = args.max_train_steps, resume_step or 0
        self.started = time.perf_counter() if started is None else started
        self.since = "model loading included" if started is not None else "since the model loaded"
        self.completed_step: int | None = None  # the run's last step, once logged
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

    def _open_bar(self, first_step_seconds: float) -> None:
        """The progress bar, on stderr (on a file or pipe through `_BarStream`), opened after the
        first step and dated back to that step's start, so its first rate is the step's."""
        from tqdm.auto import tqdm

        stream = sys.stderr
        if not _is_terminal(stream):
            stream = self.bar_stream = _BarStream(stream)
        self.bar = tqdm(total=self.total_steps, initial=self.resumed_at, desc=self.kind, dynamic_ncols=True,
                        file=stream)
        if not self.bar.disable:  # a disabled bar (TQDM_DISABLE=1) keeps no clock
            self.bar.start_t -= first_step_seconds
            self.bar.last_print_t = self.bar.start_t

    def step(self, step: int, loss: float, rate: float, grad_norm: float, last: bool = False) -> None:
        """Record one optimizer step; the CSV gets a row every `--log_csv_steps` steps and at the
        `last` step of the run, so a run shorter than the interval still leaves one."""
        if not self.active:
            return
        now = time.perf_counter()
        seconds = now - self.last_time
        speed = 1.0 / max(seconds, 1e-9)
        self.last_time = now
        self.window = (self.window + [loss])[-100:]
        if self.bar is None and self.completed_step is None:
            self._open_bar(seconds)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rate:.3g}", refresh=False)
            self.bar.update(1)
        if last:
            self.completed_step = step
            self._close_bar()
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
        if self.active:
            self._line(text, sys.stderr)

    def _line(self, text: str, stream) -> None:
        """`text` on `stream`, starting a line of its own whatever the bar has drawn."""
        if self.bar is not None and self.bar_stream is None:
            self.bar.write(text, file=stream)  # a terminal: tqdm clears the bar, writes, redraws
            return
        if self.bar_stream is not None:
            self.bar_stream.end_line()
        print(text, file=stream, flush=True)

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

    def finished_line(self) -> str | None:
        """The run's closing line, once its last step was logged: how long it took, where its
        files are (None before then, and on other processes)."""
        if not self.active or self.completed_step is None:
            return None
        return (f"Done in {_duration(time.perf_counter() - self.started)} ({self.since}): "
                f"step {self.completed_step}, files in {self.output_dir}")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()  # ends the bar's line
            self.bar = None
        if self.bar_stream is not None:
            self.bar_stream.end_line()
            self.bar_stream = None

    def close(self) -> None:
        """Close the bar and the trackers, then say how long the run took and where its files
        are (when it reached its last step); a second call does nothing."""
        self._close_bar()
        closing = self.finished_line()
        if closing is not None:
            self.completed_step = None
            print(closing, flush=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class _BarStream:
    """The progress bar's file when it is not a terminal: flushes stdout before each frame (so
    lines printed before it come first in a shared log file) and knows whether a frame left the
    line open, so that `end_line` can end it before another line is written."""

    def __init__(self, stream):
        self.stream = stream
        self.open = False

    def write(self, text: str) -> int:
        if text:
            sys.stdout.flush()
            self.open = not text.endswith("\n")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def end_line(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


def _duration(seconds: float) -> str:
    """`42.3 s`, `3 min 5 s`, `1 h 2 min`: as a person reads a run's length."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, whole = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {whole} s"
    return f"{minutes // 60} h {minutes % 60} min"


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
