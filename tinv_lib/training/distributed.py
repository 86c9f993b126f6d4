"""Gradient averaging over a torch.distributed process group, shared by every training loop."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def average_gradients(params: Iterable[torch.nn.Parameter], processes: int) -> None:
    """Replace each parameter's gradient by its mean over the `processes` of the group.

    One all-reduce of all gradients flattened together: a model has hundreds of small tensors,
    and an all-reduce per tensor pays gloo's per-call cost hundreds of times a step. Parameters
    without a gradient are left out (on every rank alike, since all ranks run the same model).
    """
    if processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= processes
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
