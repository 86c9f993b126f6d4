"""What is measured and how: step clocks, peak memory, and the bytes of optimizer state and gradients.

Step times come from callbacks the training loop calls after every optimizer step, so they
cover everything the loop does for a step (on a GPU, after the queued work has finished). The
first `warmup` steps are left out: they pay for lazy set-up, compilation and allocator growth.
Bytes are counted on the tensors themselves (optimizer state, gradients as they accumulate, and
any gradient a frozen weight holds, which must be none), so the O(num_vectors x width) claim is
checked, not assumed.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.bench.floor import Floor

MB = 1024 * 1024


def _now(device: torch.device) -> float:
    """Wall time after the GPU has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock:
    """An `on_step` callback recording the durations of steps `warmup+1, ...`: the first steps
    pay for lazy set-up, compilation and allocator growth."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.durations: list[float] = []
        self.last: float | None = None
        self.created = time.perf_counter()
        self.warm_seconds: float | None = None  # from creation to the end of the warm-up steps

    def __call__(self, step: int) -> None:
        now = _now(self.device)
        if self.last is not None and step > self.warmup:
            self.durations.append(now - self.last)
        if step == self.warmup:
            self.warm_seconds = now - self.created
        self.last = now


class PairClock:
    """An `on_step` callback for our trainer that runs one floor step inside each call.

    Our step k is timed from the end of call k-1 to the start of call k (everything the
    training loop does for a step); the floor step in between is timed by itself. The two
    alternate step by step, so load from other jobs on a shared machine hits both alike, and
    each pair of neighbouring steps gives a ratio.
    """

    def __init__(self, floor: Floor, warmup: int, device: torch.device) -> None:
        self.floor, self.warmup, self.device = floor, warmup, device
        self.ours: list[float] = []
        self.floors: list[float] = []
        self.last: float | None = None

    def __call__(self, step: int) -> None:
        entered = _now(self.device)
        self.floor.step()
        left = _now(self.device)
        if self.last is not None and step > self.warmup:
            self.ours.append(entered - self.last)
            self.floors.append(left - entered)
        self.last = left


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM: the current process image only, unlike
    `ru_maxrss`, which after fork+exec can include the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (shared ones, like bitsandbytes' quantisation maps, once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the per-parameter optimizer state (AdamW: exp_avg and exp_avg_sq; the scalar
    step counter is left out so the figure reads as `params x 4 bytes x 2`)."""
    return tensor_bytes(value for state in optimizer.state.values() for key, value in state.items()
                        if isinstance(value, torch.Tensor) and key != "step")


class GradMeter:
    """Largest gradient bytes seen per trainable tensor (hooks fire after accumulation)."""

    def __init__(self, params) -> None:
        self.bytes: dict[int, int] = {}
        for param in params:
            param.register_post_accumulate_grad_hook(self._record)

    def _record(self, param) -> None:
        self.bytes[id(param)] = max(self.bytes.get(id(param), 0), param.grad.numel() * param.grad.element_size())

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def frozen_grad_bytes(modules) -> int:
    """Gradient bytes held by the base model's weights: must be 0 (nothing frozen trains)."""
    return sum(p.grad.numel() * p.grad.element_size() for m in modules for p in m.parameters() if p.grad is not None)


def memory_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_report(device) -> dict:
    """Peak RSS, and on a GPU the peak allocated / reserved bytes since `memory_reset`."""
    report = {"rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        report["gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        report["gpu_reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
    return report


def byte_counts(optimizer, params, grads: GradMeter, frozen: int) -> dict:
    """Optimizer state and gradient bytes of the trainables; gradient bytes on frozen weights."""
    return {"optimizer_bytes": optimizer_state_bytes(optimizer), "grad_bytes": grads.total, "frozen_grad_bytes": frozen,
            "trainable_params": sum(p.numel() for p in params)}


def alone_result(clock: StepClock, device, optimizer, params, grads: GradMeter, frozen: int) -> dict:
    """A run by itself: steps/s (median step), bytes, peak memory."""
    return {"alone_steps_per_s": 1 / statistics.median(clock.durations), **byte_counts(optimizer, params, grads, frozen),
            **memory_report(device)}
