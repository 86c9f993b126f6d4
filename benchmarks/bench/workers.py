"""Who runs the measurements: one worker process per job, rounds taken in turn.

Each (variant, task) gets its own process, set up once, so its memory is its own and a
variant's compiled or cached state never leaks into another's; the parent asks each worker for
one measured round at a time, going round all of them, so a slow spell of a shared machine is
spread over every variant. Afterwards each step kind runs once more by itself in a fresh process
for its peak memory. `--inline` runs everything in this process instead (smoke tests).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from benchmarks.bench.floor import Floor
from benchmarks.bench.jobs import FLOOR_OF, Job, quiet
from benchmarks.bench.report import PairRow
from benchmarks.bench.trainer import Pair, Trainer
from benchmarks.bench.variants import Options


def make_runner(job: Job):
    """What measures `job`: a `Pair`, or a trainer or floor by itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if job.threads:
        torch.set_num_threads(job.threads)
    with quiet():
        if job.mode == "pair":
            return Pair(job)
        if job.task in FLOOR_OF:
            return Trainer(job)
        return Floor(job, hypernetwork=job.task == "floor-hn")


def _worker(connection, job: Job) -> None:
    """Worker process: set up once, then run one measured round per request."""
    try:
        runner = make_runner(job)
        connection.send({"ready": True})
        while connection.recv() == "round":
            connection.send(runner.round())
    except Exception as error:  # noqa: BLE001 - reported to the parent, which stops the run
        import traceback

        connection.send({"error": f"{job.mode} {job.task} {job.options}: {error}\n{traceback.format_exc()}"})


class Workers:
    """One worker process per job, so each has its own memory; rounds run them one at a time."""

    def __init__(self, jobs: list[Job]) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        for job in jobs:
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, job), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
        for pipe in self.pipes:
            _checked(pipe.recv())

    def round(self, index: int) -> dict:
        self.pipes[index].send("round")
        return _checked(self.pipes[index].recv())

    def close(self) -> None:
        for pipe, process in zip(self.pipes, self.processes):
            with contextlib.suppress(OSError):
                pipe.send("stop")
            process.join(timeout=60)


def _checked(message: dict) -> dict:
    if "error" in message:
        raise SystemExit(f"worker failed: {message['error']}")
    return message


class InlineWorkers:
    """The same in this process (smoke tests; peak memory then covers every job so far)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.runners = [make_runner(job) for job in jobs]

    def round(self, index: int) -> dict:
        return self.runners[index].round()

    def close(self) -> None:
        self.runners.clear()


def measure(jobs: list[Job], repeats: int, inline: bool, memory: bool, log: Callable[[str], None]) -> list[PairRow]:
    """`repeats` paired rounds over all jobs in turn; then each side alone once for memory."""
    rows = [PairRow(job.options.label(Options()), job.task) for job in jobs]
    pool = InlineWorkers(jobs) if inline else Workers(jobs)
    try:
        for round_index in range(repeats):
            for index, row in enumerate(rows):
                row.rounds.append(pool.round(index))
            log(f"round {round_index + 1}/{repeats}: " + ", ".join(
                f"{row.variant}/{row.task} {1 / statistics.median(row.rounds[-1]['ours']):.2f} steps/s, "
                f"x{row.ratios()[-1]:.3f}" for row in rows))
    finally:
        pool.close()
    if memory:
        for job, row in zip(jobs, rows):
            for kind in (FLOOR_OF[job.task], job.task):
                alone = replace(job, mode="alone", task=kind, steps=min(job.steps, 5))
                single = InlineWorkers([alone]) if inline else Workers([alone])
                try:
                    row.alone[kind] = single.round(0)
                finally:
                    single.close()
            log(f"memory {row.variant}/{row.task}: " + ", ".join(
                f"{kind} {result['rss_mb']:.0f} MB RSS" for kind, result in row.alone.items()))
    return rows
