"""What a run prints and writes: per-round figures to medians, the table, and the checks.

Every figure is a median over rounds (each round's own figure being the median step), with
the min and max beside it; the ratio to the floor is taken pair by pair within a round, so it
holds even when the machine's speed drifts. The checks restate the issue's acceptance limits
(our step / its floor) and the byte claim (TI state is num_vectors x width, not the vocabulary).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.bench.jobs import FLOOR_OF
from benchmarks.bench.presets import CLIP_VOCAB, Preset

NAMES = {"floor-ti": "TI floor", "ti": "TI ours", "floor-hn": "HN floor", "hn": "HN ours"}


@dataclass
class PairRow:
    """One (variant, task): the paired rounds, and each side's run by itself (memory, bytes)."""

    variant: str
    task: str
    rounds: list[dict] = field(default_factory=list)
    alone: dict[str, dict] = field(default_factory=dict)

    def _side(self, side: str) -> list[float]:
        """Steps/s of one side per round: 1 / the median step time (robust to a stray slow step)."""
        return [1 / statistics.median(r[side]) for r in self.rounds]

    def ratios(self) -> list[float]:
        """Per round: the median over neighbouring (our step / floor step) pairs."""
        return [statistics.median(o / f for o, f in zip(r["ours"], r["floor"])) for r in self.rounds]

    def versus(self, base: PairRow, side: str) -> float:
        """Speed relative to `base` (the first variant), round by round: median of
        base step time / this step time, each the round's median."""
        return statistics.median(statistics.median(b[side]) / statistics.median(r[side])
                                 for r, b in zip(self.rounds, base.rounds))

    def summaries(self, base: PairRow) -> list[dict]:
        """The floor's line and ours."""
        lines = []
        for side, kind in (("floor", FLOOR_OF[self.task]), ("ours", self.task)):
            rates = self._side(side)
            line = {"variant": self.variant, "kind": kind, "vs_first_variant": self.versus(base, side),
                    "steps_per_s_median": statistics.median(rates),
                    "steps_per_s_min": min(rates), "steps_per_s_max": max(rates), "rounds_steps_per_s": rates,
                    "ratio_median": statistics.median(self.ratios()) if side == "ours" else None,
                    "rounds_ratio": self.ratios() if side == "ours" else None}
            line.update(self.rounds[-1]["bytes"][kind])
            line.update(self.alone.get(kind, {}))
            if side == "ours" and self.rounds[-1].get("prompt_cache"):
                line["prompt_cache"] = self.rounds[-1]["prompt_cache"]
            lines.append(line)
        return lines


def machine_description() -> str:
    """CPU model, cores and torch threads, or the GPU; other load is the reader's caveat."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def format_table(summaries: list[dict], gpu: bool) -> str:
    """A Markdown table of the medians; memory and bytes come from each side's run by itself."""
    memory = "peak RSS MB | GPU allocated MB | GPU reserved MB" if gpu else "peak RSS MB"
    lines = [f"| variant | step | steps/s median (min-max) | speed vs first variant | x floor, median | {memory} "
             "| optimizer state B | gradients B | start to timed steps s |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]
    for s in summaries:
        ratio = f"**{s['ratio_median']:.3f}**" if s["ratio_median"] is not None else ""
        cells = [f"{s['rss_mb']:.0f}" if "rss_mb" in s else "-"]
        if gpu:
            cells += [f"{s[key]:.0f}" if key in s else "-" for key in ("gpu_allocated_mb", "gpu_reserved_mb")]
        cells += [f"{s[key]:,}" if key in s else "-" for key in ("optimizer_bytes", "grad_bytes")]
        cells.append(f"{s['startup_s']:.1f}" if s.get("startup_s") is not None else "")
        lines.append(f"| {s['variant']} | {NAMES[s['kind']]} | {s['steps_per_s_median']:.2f} "
                     f"({s['steps_per_s_min']:.2f}-{s['steps_per_s_max']:.2f}) | {s['vs_first_variant']:.3f} | {ratio} | "
                     f"{' | '.join(cells)} |")
    return "\n".join(lines)


def byte_lines(summaries: list[dict], preset: Preset, num_vectors: int) -> list[str]:
    """Acceptance 2: TI optimizer state and gradients against num_vectors x width, and against
    the vocabulary matrix a full-matrix trainer (diffusers, kohya) would hold."""
    widths = [spec["hidden_size"] for spec in preset.text_encoders]
    shown = " + ".join(map(str, widths))
    expected, vocabulary = num_vectors * sum(widths) * 4, CLIP_VOCAB * sum(widths) * 4
    lines = []
    for s in summaries:
        if s["kind"] == "ti" and "optimizer_bytes" in s:
            lines.append(
                f"[{s['variant']}] TI: optimizer state {s['optimizer_bytes']:,} B, gradients {s['grad_bytes']:,} B, "
                f"gradients on frozen weights {s['frozen_grad_bytes']:,} B. num_vectors x width x 4 B = "
                f"{num_vectors} x ({shown}) x 4 = {expected:,} B; AdamW keeps 2x that = {2 * expected:,} B. "
                f"A full vocabulary matrix ({CLIP_VOCAB} x ({shown})) would be {vocabulary:,} B of gradients "
                f"and {2 * vocabulary:,} B of AdamW state.")
    return lines


def prompt_cache_lines(summaries: list[dict]) -> list[str]:
    """The hypernetwork's one-off prompt encodes, which the timed steps leave out."""
    return [f"[{s['variant']}] HN: each distinct prompt is encoded once per run, at first use: "
            f"{s['prompt_cache']['prompts']} prompts took {s['prompt_cache']['seconds']:.2f} s in all "
            "(done before the timed steps, as the floor does)" for s in summaries if s.get("prompt_cache")]


def acceptance_lines(summaries: list[dict], limits: dict[str, float]) -> list[str]:
    """The issue's limits on the ratio to the floor, checked on the medians."""
    lines = []
    for s in summaries:
        if s["kind"] in limits and s["ratio_median"] is not None:
            ok = s["ratio_median"] <= limits[s["kind"]]
            lines.append(f"[{s['variant']}] {s['kind'].upper()} step / its floor = {s['ratio_median']:.3f} "
                         f"(per-round: {', '.join(f'{r:.3f}' for r in s['rounds_ratio'])}; "
                         f"limit {limits[s['kind']]}): {'ok' if ok else 'OVER'}")
    return lines
