"""A measurement as a worker receives it (`Job`), and what floor, trainer and workers share.

A job is plain data, so it crosses into a worker process as it is: which task ("ti", "hn"),
measured how ("pair": our trainer and its floor step by step; "alone": one of them by itself,
for memory), with which options, on which model, data and sizes.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch

from benchmarks.bench.presets import Preset
from benchmarks.bench.variants import Options

FLOOR_OF = {"ti": "floor-ti", "hn": "floor-hn"}
PLACEHOLDER = "my-concept"


@dataclass
class Job:
    """What a worker measures: `mode` "pair" times `task` ("ti" or "hn") and its floor step by
    step side by side; "alone" runs one of "ti", "hn", "floor-ti", "floor-hn" by itself, for
    its peak memory and byte counts."""

    mode: str
    task: str
    options: Options
    model: str
    data: str
    preset: Preset
    batch: int
    resolution: int
    num_vectors: int
    warmup: int
    steps: int
    seed: int
    workdir: str
    threads: int | None = None


def device() -> torch.device:
    """The device the trainers pick (accelerate: the GPU when there is one)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def quiet():
    """Silence the trainers' summaries, progress bars and load-time warnings."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
