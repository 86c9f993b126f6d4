"""An exponential moving average of the trainables (`--ema_decay`), with warm-up.

The average smooths the last steps' noise out of the trained vectors or modules. Its decay
warms up as in the diffusers examples' EMA: the n-th update (from 0) uses
min(decay, (1 + n) / (10 + n)), so the first updates follow the weights closely instead of
being dragged towards the initial state for thousands of steps.

The average and its update count are part of every checkpoint, so a resumed run continues the
same average; `--save_ema` makes saved files and previews show it.
"""

from __future__ import annotations

import torch


class ExponentialMovingAverage:
    """The average of named tensors, updated after every optimizer step."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float, updates: int = 0):
        self.decay = decay
        self.updates = updates
        self.average = {name: tensor.detach().clone().float() for name, tensor in tensors.items()}

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        decay = self.decay_at(self.updates)
        for name, tensor in tensors.items():
            self.average[name].mul_(decay).add_(tensor.detach().float(), alpha=1 - decay)
        self.updates += 1

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        return {name: tensor.clone() for name, tensor in self.average.items()}, self.updates

    def load_state(self, average: dict[str, torch.Tensor], updates: int) -> None:
        self.average = {name: tensor.detach().float().to(self.average[name].device).clone()
                        for name, tensor in average.items()}
        self.updates = updates
