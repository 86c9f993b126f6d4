"""How a training checkpoint is recognised by code that must never read it as something else.

A training output folder holds the embedding or hypernetwork a user wants next to resumable
checkpoints (`checkpoint-<step>/`: `trainable.safetensors`, `optimizer.pt`, `state.json`). When a
user points generate.py's `--embeddings_dir` or `--hypernetwork_dir` at that folder, the
checkpoint's tensors must not pass for an embedding called "trainable" nor its optimizer state for
a hypernetwork called "optimizer". The folder scans skip a checkpoint by its layout, and the
checkpoint's `trainable.safetensors` also says what it is in its header (`CHECKPOINT_MARKER`), so
the file still refuses to be an embedding when copied elsewhere. `training/checkpoints.py` writes
both.
"""

from __future__ import annotations

from pathlib import Path

STATE_FILE = "state.json"  # what every complete checkpoint folder holds
CHECKPOINT_MARKER = "tinv_training_checkpoint"  # safetensors header key of a checkpoint's trainable tensors


def is_training_checkpoint(folder: Path) -> bool:
    """A checkpoint folder, complete or half-written (`.checkpoint-<step>.partial-<pid>`)."""
    return folder.name.startswith(".checkpoint-") or (folder / STATE_FILE).is_file()
