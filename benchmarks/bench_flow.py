"""FLUX.1 and SD3 beside SDXL at the bench's scaled-down size: step time and peak memory.

Textual inversion on three models built from config with random weights, scaled down alike
(issue 33's closing note): `sdxl-bench` (the speed benchmark's preset: UNet 64/128/256, CLIP 256 +
384), `flux-bench` (CLIP-L 256, T5 512 wide with 4 layers and the real 32128-row vocabulary,
a 256-wide FLUX.1 transformer with 2 double and 4 single blocks, guidance embedding) and
`sd3-bench` (CLIP-L 256 + CLIP-G 384, the same T5, a 256-wide SD3 transformer with 4 joint
blocks). T5 reads the pipelines' real sequence lengths (FLUX.1 512, SD3 256): that, more than the
transformer, is what the flow families add. FLUX.1 also runs with `--train_encoders clip_l`
(no backward through T5). Each row is a fresh process at 64 px, batch 4, timed from its first
step to its last; peak RSS is the process's (`VmHWM`).

    OMP_NUM_THREADS=1 python benchmarks/bench_flow.py --steps 12 --repeats 2

Prints one markdown table with the ratios against SDXL of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # as a script (the parent and each child): import the checkout's tinv_lib
    import _setup

    _setup.prepare_script(HF_HUB_OFFLINE="1")

T5_VOCAB = 32128  # T5's real vocabulary: the rows the frozen encoder holds


def _rss_mb(field: str) -> float:
    """`VmHWM` (peak) of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=max(T5_VOCAB, len(tokenizer)), d_model=512, d_kv=64, d_ff=1280,
                                   num_layers=4, num_heads=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def _clip(tokenizer, width: int, layers: int, heads: int, projection: bool, act: str = "quick_gelu"):
    from benchmarks.bench.presets import CLIP_VOCAB
    from testing.tiny import make_text_encoder

    return make_text_encoder(tokenizer, width, projection, act, layers=layers, heads=heads, intermediate=4 * width,
                             vocab_size=max(CLIP_VOCAB, len(tokenizer)))


def build_flow(arch: str, folder: Path, seed: int = 0) -> Path:
    """`flux-bench` or `sd3-bench` as a diffusers folder."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from testing.tiny_flow import build_t5_tokenizer, make_flow_vae
    from testing.tokenizer_build import END_TOKEN, build_clip_tokenizer

    torch.manual_seed(seed)
    clip_l_tokenizer = build_clip_tokenizer(folder.parent / f"{arch}-tok", pad_token=END_TOKEN)
    t5_tokenizer = build_t5_tokenizer()
    if arch == "flux-bench":
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                             attention_head_dim=64, num_attention_heads=4, joint_attention_dim=512,
                                             pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=make_flow_vae(0.3611, 0.1159), transformer=transformer,
                            text_encoder=_clip(clip_l_tokenizer, 256, 4, 4, False), tokenizer=clip_l_tokenizer,
                            text_encoder_2=_t5(t5_tokenizer), tokenizer_2=t5_tokenizer)
    else:
        clip_g_tokenizer = build_clip_tokenizer(folder.parent / f"{arch}-tok-2", pad_token="!")
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=4,
                                            attention_head_dim=64, num_attention_heads=4, joint_attention_dim=512,
                                            caption_projection_dim=256, pooled_projection_dim=256 + 384,
                                            out_channels=16, pos_embed_max_size=16)
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=make_flow_vae(1.5305, 0.0609),
            transformer=transformer, text_encoder=_clip(clip_l_tokenizer, 256, 4, 4, True), tokenizer=clip_l_tokenizer,
            text_encoder_2=_clip(clip_g_tokenizer, 384, 4, 6, True, act="gelu"), tokenizer_2=clip_g_tokenizer,
            text_encoder_3=_t5(t5_tokenizer), tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def child(config: dict) -> None:
    """One training run in this process: time per step after the first, peak RSS."""
    from tinv_lib.training.loop import train
    from tinv_lib.training.runner import prepare_process
    from tinv_lib.training.task import TrainingHooks
    from tinv_lib.training.textual_inversion import TextualInversionTask, parse_args

    args = parse_args(config["argv"])
    stamps: list[float] = []
    prepare_process()
    assert train(args, TextualInversionTask(args), TrainingHooks(on_step=lambda _: stamps.append(time.perf_counter()))) == 0
    print(json.dumps({"ms_per_step": 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1),
                      "peak_rss_mb": _rss_mb("VmHWM")}))


def measure(model: Path, data: Path, out: Path, steps: int, extra: list[str]) -> dict:
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--placeholder_token", "tok", "--initializer_token", "a toy", "--num_vectors", "2", "--resolution", "64",
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--report_to", "none", "--validation_steps",
            "0", "--save_steps", "0", "--checkpointing_steps", "0", *extra]
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps({"argv": argv})], capture_output=True,
                          text=True, env=os.environ)
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (batch 4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row (medians), interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    from benchmarks.bench.presets import PRESETS, prepare_images, prepare_model

    with tempfile.TemporaryDirectory(prefix="bench-flow-") as work:
        root = Path(work)
        data = prepare_images(root / "images", 8, 64)
        models = {"sdxl-bench": prepare_model(PRESETS["sdxl-bench"], 0, root),
                  "flux-bench": build_flow("flux-bench", root / "flux-bench"),
                  "sd3-bench": build_flow("sd3-bench", root / "sd3-bench")}
        rows = [("SDXL (clip_l + clip_g)", "sdxl-bench", []), ("FLUX.1 (clip_l + t5)", "flux-bench", []),
                ("FLUX.1, --train_encoders clip_l", "flux-bench", ["--train_encoders", "clip_l"]),
                ("SD3 (clip_l + clip_g + t5)", "sd3-bench", [])]
        runs: list[list[dict]] = [[] for _ in rows]
        for repeat in range(args.repeats):  # interleaved, so a change in the machine's load hits every row alike
            for index, (_, model, extra) in enumerate(rows):
                runs[index].append(measure(models[model], data, root / f"out-{index}-{repeat}", args.steps, extra))
    base_time = statistics.median(run["ms_per_step"] for run in runs[0])
    base_rss = statistics.median(run["peak_rss_mb"] for run in runs[0])
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.steps} steps at batch 4, 64 px; "
          f"medians of {args.repeats} interleaved runs")
    print("| model | ms / step | x SDXL | peak RSS MB | x SDXL |\n|---|---|---|---|---|")
    for (label, _, _), measured in zip(rows, runs):
        time_ms = statistics.median(run["ms_per_step"] for run in measured)
        rss = statistics.median(run["peak_rss_mb"] for run in measured)
        print(f"| {label} | {time_ms:.0f} | {time_ms / base_time:.2f} | {rss:.0f} | {rss / base_rss:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
