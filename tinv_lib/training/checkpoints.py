"""Training checkpoints: small, atomic, and enough for an exact resume.

A checkpoint folder `checkpoint-<step>/` holds only what the run cannot recompute: the trainable
tensors (kilobytes for an embedding, not the whole text encoder as in the diffusers example),
the optimizer state (8-bit states included), the fp16 grad-scaler state, the moving average
with `--ema_decay` and `state.json`
(step, start step, what is trained, the model's architecture and each trained tensor's shape, so
a resume with another model or `--num_vectors` is refused in one line before the model loads;
the fixed-batch losses behind `--early_stopping` and `--keep_best`, and `--norm_mode`'s targets).
Data order, noise and the learning rate are functions of the step (see
`tinv_lib.training.data`), so no RNG state is needed. `trainable.safetensors` says in its header
that it is a checkpoint's state, so no embeddings folder takes it for an embedding.

A folder is written under a temporary name and renamed when complete, so `latest` never picks a
half-written checkpoint, whatever moment the process is killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tinv_lib.common.atomic import atomic_path
from tinv_lib.common.errors import TinvError
from tinv_lib.common.torch_files import safe_torch_load, save_a1111_pt
from tinv_lib.common.training_folders import CHECKPOINT_MARKER, STATE_FILE

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STREAM_FILE = "stream.json"  # with --streaming: the stream's position, the same on every process


class CheckpointError(TinvError):
    """A checkpoint to resume from is missing or does not fit this run."""


@dataclass
class CheckpointState:
    """What a checkpoint restores."""

    step: int
    start_step: int
    kind: str
    name: str
    tensors: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict | None
    ema: tuple[dict[str, torch.Tensor], int] | None = None  # moving average and its update count
    batch: BatchShape | None = None  # how the global batch was made (None: a checkpoint from before it was kept)
    architecture: str | None = None  # the base model's ("sd1", "sdxl", ...; None: not recorded)
    stream: dict | None = None  # with --streaming: where the stream stands (`StreamPlan.stream_state`)
    fixed_batch: dict | None = None  # the fixed-batch losses, best step, early stop (`FixedBatchHistory.state`)
    norm_control: dict | None = None  # `--norm_mode`'s targets (`NormControl.state`)


@dataclass(frozen=True)
class BatchShape:
    """The global batch of a run: images per process and micro-batch x processes x accumulation.

    Data order is a function of the global batch only (`data.BatchPlan`), so a checkpoint resumes
    exactly on any number of processes that makes the same global batch."""

    per_process: int
    processes: int
    accumulation: int

    @property
    def size(self) -> int:
        return self.per_process * self.processes * self.accumulation

    def describe(self) -> str:
        return (f"{self.size} ({self.per_process} per process x {self.processes} processes x "
                f"{self.accumulation} accumulation)")


def save_checkpoint(output_dir: Path, state: CheckpointState, keep_last: int | None = None,
                    keep: Path | None = None) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically; then delete the oldest checkpoints beyond
    `keep_last`, but never the one just written nor `keep` (the checkpoint the run resumed
    from: a run resumed from an older checkpoint must not lose it to newer ones of the
    abandoned timeline, nor delete what it has just written)."""
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{state.step}"
    partial = output_dir / f".checkpoint-{state.step}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    with atomic_path(partial / "trainable.safetensors") as tmp:  # safetensors creates its files 0600
        save_file({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}, str(tmp),
                  metadata={CHECKPOINT_MARKER: state.kind})
    save_a1111_pt(state.optimizer, partial / "optimizer.pt")
    if state.scaler is not None:
        save_a1111_pt(state.scaler, partial / "scaler.pt")
    meta = {"step": state.step, "start_step": state.start_step, "kind": state.kind, "name": state.name,
            "tensors": {key: list(value.shape) for key, value in state.tensors.items()}}
    if state.architecture is not None:
        meta["architecture"] = state.architecture
    if state.batch is not None:
        meta.update(global_batch=state.batch.size, per_process_batch=state.batch.per_process,
                    world_size=state.batch.processes, gradient_accumulation_steps=state.batch.accumulation)
    if state.ema is not None:
        average, meta["ema_updates"] = state.ema
        with atomic_path(partial / "ema.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in average.items()}, str(tmp))
    if state.stream is not None:
        (partial / STREAM_FILE).write_text(json.dumps(state.stream, indent=1))
    for key in ("fixed_batch", "norm_control"):
        if getattr(state, key) is not None:
            meta[key] = getattr(state, key)
    (partial / STATE_FILE).write_text(json.dumps(meta, indent=1))
    if final.exists():
        stale = output_dir / f".checkpoint-{state.step}.stale-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(partial, final)
    if keep_last:
        protected = {final.resolve(), *([keep.resolve()] if keep is not None else [])}
        others = [path for path in list_checkpoints(output_dir) if path.resolve() not in protected]
        for old in others[:max(0, len(others) + 1 - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_files(output_dir: Path) -> None:
    """Delete what a killed run left half-written (temporary files and checkpoint folders)."""
    if not output_dir.is_dir():
        return
    for path in output_dir.rglob(".*"):
        if path.is_dir() and ".partial-" in path.name or ".stale-" in path.name:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name)[1]))


def resolve_checkpoint(argument: str, output_dir: Path) -> Path | None:
    """`latest` (None when there is none yet: a fresh start) or an explicit folder."""
    if argument == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(argument)
    if not path.is_dir() and (output_dir / argument).is_dir():
        path = output_dir / argument
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {argument}: not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(path: Path, kind: str, expected: dict[str, torch.Tensor] | None = None) -> CheckpointState:
    """Read a checkpoint folder; refuse one written by the other trainer, or (given the tensors
    this run trains, `expected`) one whose tensors do not fit them: a checkpoint from before
    `state.json` recorded its shapes gets here without the check before the model loads."""
    from safetensors.torch import load_file

    meta = read_state(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: a {meta.get('kind')} checkpoint cannot resume {kind} training")
    tensors = load_file(str(path / "trainable.safetensors"))
    if expected is not None:
        _check_fits(path, tensors, expected)
    scaler_file, ema_file = path / "scaler.pt", path / "ema.safetensors"
    return CheckpointState(
        step=int(meta["step"]),
        start_step=int(meta.get("start_step", 0)),
        kind=kind,
        name=meta.get("name", ""),
        tensors=tensors,
        optimizer=safe_torch_load(path / "optimizer.pt"),
        scaler=safe_torch_load(scaler_file) if scaler_file.is_file() else None,
        ema=(load_file(str(ema_file)), int(meta["ema_updates"])) if ema_file.is_file() else None,
        batch=batch_shape_of(meta),
        architecture=meta.get("architecture"),
        fixed_batch=meta.get("fixed_batch"),
        norm_control=meta.get("norm_control"),
    )


def describe_shapes(shapes: dict[str, list[int]]) -> str:
    """`emb_params [4, 768]`; a hypernetwork's many tensors are counted, not listed."""
    if len(shapes) > 4:
        return f"{len(shapes)} tensors"
    return ", ".join(f"{key} {list(shape)}" for key, shape in shapes.items())


def _check_fits(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """One line naming what differs when the checkpoint's tensors are not this run's."""
    have = {key: list(value.shape) for key, value in tensors.items()}
    want = {key: list(value.shape) for key, value in expected.items()}
    if have == want:
        return
    if len(have) > 4 and have.keys() == want.keys():  # a hypernetwork: name the first tensor that differs
        key = next(key for key in want if have[key] != want[key])
        have, want = {key: have[key]}, {key: want[key]}
    raise CheckpointError(f"--resume_from_checkpoint: {path.name} holds {describe_shapes(have)}; this run trains "
                          f"{describe_shapes(want)} (another model or other settings than the run that wrote it): "
                          "resume with those, or start a new --output_dir")


def batch_shape_of(meta: dict) -> BatchShape | None:
    """The batch shape recorded in a checkpoint's `state.json`, if it has one."""
    if "global_batch" not in meta:
        return None
    return BatchShape(int(meta["per_process_batch"]), int(meta["world_size"]), int(meta["gradient_accumulation_steps"]))


def read_state(path: Path) -> dict:
    """A checkpoint folder's `state.json`, without loading its tensors (for the checks before the model loads)."""
    return json.loads((path / STATE_FILE).read_text())


def read_batch_shape(path: Path) -> BatchShape | None:
    """`batch_shape_of` a checkpoint folder, without loading its tensors (for the checks before the model loads)."""
    return batch_shape_of(read_state(path))


def read_stream_state(path: Path) -> dict | None:
    """The stream position a checkpoint folder holds (None: not trained from a stream)."""
    stream = path / STREAM_FILE
    return json.loads(stream.read_text()) if stream.is_file() else None
