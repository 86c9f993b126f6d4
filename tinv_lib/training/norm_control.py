"""Norm control of textual-inversion vectors: `--norm_mode preserve|direction`, `--norm_target`.

Trained vectors tend to grow far past the norms of the vocabulary's words and then outweigh the
rest of the prompt (docs/training.md, "Norm control"). Two ways to hold each vector's L2 norm at
a target:

- `preserve`: after every optimizer step, rescale each vector to its target norm (as
  OneTrainer's `preserve_embedding_norm`). The optimizer sees the plain gradient; part of each
  step, along the vector, is undone by the rescale.
- `direction`: only the direction is learned (DTI, arXiv 2512.13672: a Riemannian step on the
  sphere of the target radius). Before the optimizer step each vector's gradient is projected
  onto the tangent space of its sphere (the component along the vector is removed, so neither
  clipping nor the optimizer's moments see a radial part); after the step the vector is
  retracted onto the sphere by normalising it. With plain SGD this is exactly projected
  Riemannian gradient descent with the normalising retraction; with Adam-like optimizers it is
  their step of the tangent gradient, retracted (the moments are not transported between
  tangent spaces, a common simplification).

Targets, per vector: `vocab_median` (the median row norm of its text encoder's token embeddings),
`init` (its own norm when training started), or a number (that many times the vocabulary median).
The targets are fixed at set-up and kept in checkpoints, so a resumed run holds the same ones.
"""

from __future__ import annotations

import torch

NORM_MODES = ("none", "preserve", "direction")
TARGET_WORDS = ("vocab_median", "init")


def parse_norm_target(text: str) -> str | float:
    """`--norm_target`: vocab_median, init, or a positive number (times the vocabulary median)."""
    if text in TARGET_WORDS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r}: give vocab_median, init, or a positive number (times the "
                                         "vocabulary's median norm)")
    return value


def zero_vectors(vectors: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(key, row) of each vector whose norm is 0 (it has no direction to keep or rescale)."""
    return [(key, int(row)) for key, value in vectors.items()
            for row in torch.nonzero(torch.linalg.vector_norm(value.detach().float(), dim=1) == 0).flatten()]


class NormControl:
    """Holds every row of the trained `[num_vectors, width]` tensors at its target norm."""

    def __init__(self, mode: str, vectors: dict[str, torch.nn.Parameter], targets: dict[str, torch.Tensor]):
        self.mode = mode
        self.vectors = vectors
        self.targets = {key: value.to(torch.float32) for key, value in targets.items()}

    @classmethod
    def build(cls, mode: str, target: str | float, vectors: dict[str, torch.nn.Parameter],
              vocab_medians: dict[str, float]) -> NormControl:
        """Targets as `--norm_target` says, from the vectors as they are now (their init)."""
        targets = {}
        for key, value in vectors.items():
            rows = value.shape[0]
            if target == "init":
                targets[key] = torch.linalg.vector_norm(value.detach().float(), dim=1).cpu()
            else:
                scale = 1.0 if target == "vocab_median" else float(target)
                targets[key] = torch.full((rows,), scale * vocab_medians[key])
        return cls(mode, vectors, targets)

    def zero_vectors(self) -> list[tuple[str, int]]:
        return zero_vectors(self.vectors)

    def project_gradients(self) -> None:
        """`direction`: remove each vector's gradient component along the vector (before clipping
        and the optimizer step)."""
        if self.mode != "direction":
            return
        for value in self.vectors.values():
            if value.grad is None:
                continue
            unit = value.detach() / torch.linalg.vector_norm(value.detach(), dim=1, keepdim=True)
            value.grad.sub_(unit * (value.grad * unit).sum(dim=1, keepdim=True))

    @torch.no_grad()
    def retract(self) -> None:
        """Rescale each trained vector to its target norm (after every optimizer step)."""
        for key, value in self.vectors.items():
            if not value.requires_grad:
                continue  # --train_encoders: an untrained encoder's vectors are saved as they are
            target = self.targets[key].to(value.device, value.dtype).unsqueeze(1)
            value.mul_(target / torch.linalg.vector_norm(value, dim=1, keepdim=True))

    def state(self) -> dict:
        """Plain data for a checkpoint's `state.json`."""
        return {"mode": self.mode, "targets": {key: value.tolist() for key, value in self.targets.items()}}

    def load_state(self, state: dict) -> None:
        """The targets a checkpoint holds (the run it resumes had them)."""
        self.targets = {key: torch.tensor(values, dtype=torch.float32) for key, values in state["targets"].items()}
