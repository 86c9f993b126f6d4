"""Training-step benchmark against the physical floor (issue 9).

Speed is what cloud users pay for, so a textual-inversion (TI) step should cost what its maths
costs and nothing more. This script measures, in one run, on the same model, data, batch size,
precision and device:

* the **TI floor**: a bare loop doing only the unavoidable work of one TI step: cached latents,
  noise, text-encoder forward with the trainable vectors written into the token-embedding
  output, UNet forward, backward to the vectors (no weight gradients anywhere), AdamW step on
  the vectors. Prompts are tokenized once up front.
* **our TI step**: `train_textual_inversion`'s real training core (`tinv_lib.training.loop.train`,
  data loading, A1111 prompt encoding, logging and all), timed through its `on_step` callback.
* the **hypernetwork (HN) floor**: the same bare loop with the text encodings cached (the text
  encoder is frozen) and the hypernetwork's (k, v) modules put directly in front of every
  attention layer's `to_k` / `to_v`; backward reaches only the hypernetwork weights.
* **our HN step**: `train_hypernetwork`'s real training core.

For each it reports steps/s, the ratio to its floor, peak memory (RSS on the CPU; allocated and
reserved on a GPU) and the bytes of optimizer state and gradients, which must be
O(num_vectors x width), not O(vocabulary x width).

How: our trainer runs with an `on_step` callback that runs one floor step inside each call, so
the two alternate step by step and a machine shared with other jobs slows both alike; each
round is one whole training run, and the figures are medians over rounds. Each (variant, task)
has its own worker process; variants take turns round by round. Afterwards every step kind runs
once more by itself in a fresh process for its peak memory. docs/benchmarks.md has the results.

    python benchmarks/bench_train.py --preset bench --threads 1
    python benchmarks/bench_train.py --preset bench --threads 1 --sweep     # effect of each option
    python benchmarks/bench_train.py --preset sd15 --resolution 512 --mixed_precision bf16 \\
        --variants=default,+gc,+gc+8bit,+gc+8bit+compile                     # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_train.py` from anywhere
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 - after the environment the hub libraries read
import torch.nn.functional as F  # noqa: E402

FLOOR_OF = {"ti": "floor-ti", "hn": "floor-hn"}
CLIP_VOCAB = 49408  # the real CLIP vocabulary: the size a full-matrix trainer would optimise
PLACEHOLDER = "my-concept"
MB = 1024 * 1024


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A model (built from config with random weights), an image size and a batch size."""

    name: str
    arch: str  # "sd1" | "sdxl"
    resolution: int
    batch: int
    unet: dict
    text_encoders: tuple[dict, ...]  # CLIPTextConfig fields; the SDXL second one has a projection
    vae: dict
    about: str


def _sd1_unet(channels: tuple[int, ...], cross: int, heads: int) -> dict:
    """SD 1.x UNet topology: three cross-attention levels and a plain one, two layers each."""
    return dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=cross, attention_head_dim=heads, norm_num_groups=32,
    )


def _sdxl_unet(channels: tuple[int, ...], heads: tuple[int, ...], depth: tuple[int, ...], cross: int,
               time_dim: int, pooled: int) -> dict:
    """SDXL UNet topology: no attention at the top level, deep transformers at the bottom,
    pooled text and size ids as added conditioning."""
    return dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=heads, transformer_layers_per_block=depth, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled, cross_attention_dim=cross,
        norm_num_groups=32,
    )


def _clip(width: int, layers: int, heads: int, act: str = "quick_gelu", projection: bool = False) -> dict:
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                hidden_act=act, projection_dim=width, with_projection=projection)


def _vae(channels: tuple[int, ...], layers: int, scaling: float) -> dict:
    return dict(block_out_channels=channels, layers_per_block=layers, scaling_factor=scaling)


PRESETS = {
    "micro": Preset(
        "micro", "sd1", 64, 2, _sd1_unet((32, 32, 32, 32), 32, 4), (_clip(32, 2, 2),), _vae((32,) * 4, 1, 0.18215),
        "smoke-test size: SD 1.x topology at width 32",
    ),
    "bench": Preset(
        "bench", "sd1", 64, 4, _sd1_unet((64, 128, 256, 256), 256, 8), (_clip(256, 4, 4),),
        _vae((32, 64, 64, 64), 2, 0.18215),
        "SD 1.5 topology scaled down for 2 CPU cores: UNet 64/128/256/256, 4-layer 256-wide CLIP",
    ),
    "sdxl-bench": Preset(
        "sdxl-bench", "sdxl", 64, 4, _sdxl_unet((64, 128, 256), (1, 2, 4), (1, 2, 10), 256 + 384, 32, 384),
        (_clip(256, 4, 4), _clip(384, 4, 6, act="gelu", projection=True)), _vae((32, 64, 64, 64), 2, 0.13025),
        "SDXL topology scaled down: UNet 64/128/256 with 1/2/10 transformer layers, CLIP 256 + 384",
    ),
    "sd15": Preset(
        "sd15", "sd1", 512, 4, _sd1_unet((320, 640, 1280, 1280), 768, 8), (_clip(768, 12, 12),),
        _vae((128, 256, 512, 512), 2, 0.18215),
        "SD 1.5 architecture (UNet 860M, CLIP ViT-L/14 text) with random weights",
    ),
    "sdxl": Preset(
        "sdxl", "sdxl", 1024, 2, _sdxl_unet((320, 640, 1280), (5, 10, 20), (1, 2, 10), 2048, 256, 1280),
        (_clip(768, 12, 12), _clip(1280, 32, 20, act="gelu", projection=True)), _vae((128, 256, 512, 512), 2, 0.13025),
        "SDXL base architecture (UNet 2.6B, CLIP-L + OpenCLIP bigG) with random weights",
    ),
}


def _text_encoder(tokenizer, spec: dict):
    """A CLIP text encoder with the real CLIP vocabulary size (49408 rows), so the bytes a
    full-matrix trainer would hold are the real ones; our tokenizer uses the first few hundred."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = dict(spec)
    with_projection = spec.pop("with_projection")
    config = CLIPTextConfig(vocab_size=max(CLIP_VOCAB, len(tokenizer)), max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **spec)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_pipeline(preset: Preset, seed: int, workdir: Path):
    """The preset's pipeline from config, weights deterministic from `seed` (as `tiny_models`)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from tinv_lib.models.tokenizer_build import END_TOKEN, build_clip_tokenizer

    torch.manual_seed(seed)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    latent = preset.resolution // 2 ** (len(preset.vae["block_out_channels"]) - 1)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=32, sample_size=preset.resolution, **preset.vae)
    unet = UNet2DConditionModel(sample_size=latent, **preset.unet)
    tokenizer = build_clip_tokenizer(workdir / "tokenizer-build", pad_token=END_TOKEN)
    text_encoder = _text_encoder(tokenizer, preset.text_encoders[0])
    if preset.arch == "sd1":
        scheduler = PNDMScheduler(**betas, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    tokenizer_2 = build_clip_tokenizer(workdir / "tokenizer-2-build", pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=_text_encoder(tokenizer_2, preset.text_encoders[1]),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(**betas, steps_offset=1, timestep_spacing="leading"),
    )


def prepare_model(preset: Preset, seed: int, workdir: Path) -> Path:
    """Save the preset's pipeline as a diffusers folder once; later runs reuse it."""
    folder = workdir / f"model-{preset.name}-{preset.resolution}-seed{seed}"
    stamp = folder / "bench-preset.json"
    wanted = json.dumps(asdict(preset), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder
    pipe = build_pipeline(preset, seed, workdir)
    pipe.save_pretrained(folder, safe_serialization=True)
    stamp.write_text(wanted)
    return folder


def prepare_images(folder: Path, count: int, resolution: int) -> Path:
    """`count` drawn images at the training size, captioned by file name (A1111 style) or by
    `.txt` sidecar, so the trainers' data path (captions, templates) is the real one."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "pink"]
    shapes = ["circle", "square"]
    for index in range(count):
        colour, shape = colours[index % len(colours)], shapes[index % len(shapes)]
        stem = f"{index:05d}-0-a {colour} {shape}"
        if (folder / f"{stem}.png").is_file():
            continue
        image = Image.new("RGB", (resolution, resolution), "white")
        edge = resolution // 5 + index
        box = [edge, edge, resolution - edge // 2, resolution - edge]
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colour)
        image.save(folder / f"{stem}.png")
        if index % 2:
            (folder / f"{stem}.txt").write_text(f"{colour}, {shape}, white background", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """The optimisations under test. The defaults are the trainers' defaults."""

    latent_cache: bool = True  # floor only: the trainers always cache latents
    gradient_checkpointing: bool = False
    sdpa: bool = True  # diffusers' AttnProcessor2_0 (torch SDPA) vs the plain AttnProcessor
    channels_last: bool = False
    compile: bool = False
    use_8bit_adam: bool = False
    mixed_precision: str = "no"

    def label(self, base: Options) -> str:
        """`default`, or the differences from `base` as `+name` / `-name` / `bf16`."""
        parts = []
        for name, value in asdict(self).items():
            if value != getattr(base, name):
                parts.append(value if isinstance(value, str) else ("+" if value else "-") + name)
        return " ".join(parts) or "default"


OPTION_ALIASES = {"gc": "gradient_checkpointing", "8bit": "use_8bit_adam", "cache": "latent_cache"}


def parse_variant(text: str, base: Options) -> Options:
    """`default`, `+gradient_checkpointing+8bit`, `-sdpa`, `bf16`, `+compile-latent_cache`..."""
    import re

    if text == "default":
        return base
    changes: dict = {}
    for sign, name in re.findall(r"([+-]?)([A-Za-z0-9_]+)", text):
        if name in ("no", "fp16", "bf16") and not sign:
            changes["mixed_precision"] = name
            continue
        name = OPTION_ALIASES.get(name, name)
        if name not in Options.__dataclass_fields__ or name == "mixed_precision" or not sign:
            raise SystemExit(f"--variants {text!r}: unknown option {name!r} (use +name / -name, fp16, bf16)")
        changes[name] = sign == "+"
    return replace(base, **changes)


def sweep_variants(base: Options) -> list[Options]:
    """The base and, one at a time, each optimisation flipped: the effect of each."""
    variants = [base]
    for name, value in asdict(base).items():
        if isinstance(value, bool) and name != "latent_cache":
            variants.append(replace(base, **{name: not value}))
    variants.append(replace(base, mixed_precision="bf16" if base.mixed_precision != "bf16" else "no"))
    return variants


def apply_unet_options(unet, options: Options) -> None:
    """Attention processor, memory format and compilation: the options that act on the UNet
    the loop already loaded (precision and checkpointing are the trainers' own flags)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if options.sdpa else AttnProcessor())
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.compile:
        unet.compile()


# ----------------------------------------------------------------------------- measuring


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


class _Without:
    """A module's parameters minus some (the hypernetwork's, inside the floor's UNet)."""

    def __init__(self, module, excluded: set[int]) -> None:
        self.module, self.excluded = module, excluded

    def parameters(self):
        return (p for p in self.module.parameters() if id(p) not in self.excluded)


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


# ------------------------------------------------------------------------------- floor


class _Prefixed(torch.nn.Module):
    """`linear(hypernetwork_module(x))` as a plain module: the floor's way to put a
    hypernetwork in front of `to_k` / `to_v`, with no processor wrapper in between."""

    def __init__(self, module: torch.nn.Module, linear: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.linear = module, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.module(x))


class Floor:
    """The bare loop: only the unavoidable work of one step, on the trainers' own model, data
    and cached latents. `hypernetwork=False`: TI (text encoder forward/backward to the new
    vectors); `True`: cached text encodings and the hypernetwork modules' forward/backward."""

    def __init__(self, job: Job, hypernetwork: bool) -> None:
        import random

        from tinv_lib.models.family import family_of
        from tinv_lib.models.loading import load_base_model
        from tinv_lib.training.data import build_prompt, encode_latents, load_images, load_template

        self.job, self.hypernetwork = job, hypernetwork
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(job.options.mixed_precision, torch.float32)
        torch.manual_seed(job.seed)
        pipe, _ = load_base_model(job.model)
        self.family = family = family_of(pipe)
        for module in [family.unet, family.vae, *family.text_encoders]:
            module.requires_grad_(False).eval()
            module.to(self.device, self.dtype if module is not family.vae else torch.float32)
        if job.options.gradient_checkpointing:
            family.unet.enable_gradient_checkpointing()
            family.unet.train()
            for encoder in family.text_encoders:
                encoder.gradient_checkpointing_enable()
                encoder.train()
        apply_unet_options(family.unet, job.options)

        images, _, _ = load_images(Path(job.data), job.resolution, family.size_multiple, "buckets", False,
                                   family.latent_factor)
        encode_latents(images, family.vae, (False,), self.device, torch.float32)
        self.pixels = torch.stack([image.pixels for image in images]).to(self.device)
        self.latents = torch.stack([mean + std * torch.randn_like(std) for mean, std in
                                    (image.latents[False] for image in images)]).to(self.device) * family.latent_scale
        if job.options.latent_cache:
            family.vae.to("cpu")
        template = load_template("hypernetwork" if hypernetwork else "subject_filewords")
        rng = random.Random(job.seed)
        prompts = [build_prompt(line, image.caption, PLACEHOLDER, rng, False, 0.0) for image in images for line in template]
        self.prompt_of_image = [[i * len(template) + j for j in range(len(template))] for i in range(len(images))]
        self.scheduler = family.noise_scheduler()
        self.time_ids = torch.tensor([[job.resolution, job.resolution, 0, 0, job.resolution, job.resolution]] * job.batch,
                                     device=self.device, dtype=self.dtype)
        if hypernetwork:
            self.params = self._setup_hypernetwork(prompts)
        else:
            self.params = self._setup_vectors(prompts)
        self.optimizer = _bare_optimizer(self.params, job.options.use_8bit_adam, 0.01 if hypernetwork else 0.0)
        self.grads = GradMeter(self.params)
        self.step_index = 0

    def _setup_vectors(self, prompts: list[str]) -> list:
        """Tokenize every prompt once (A1111 chunking, so ids and slots are the trainer's) and
        hook each token embedding to write the trainable vectors at the recorded slots."""
        from tinv_lib.embeddings.formats import Embedding
        from tinv_lib.prompts.encoding import PromptEncoder

        encoder = PromptEncoder.from_pipeline(self.family.pipe)
        widths = self.family.widths
        vectors = [torch.nn.Parameter(torch.randn(self.job.num_vectors, w, device=self.device) * 0.01) for w in widths]
        fake = Embedding(PLACEHOLDER, vectors[0] if len(vectors) == 1 else dict(zip(("clip_l", "clip_g"), vectors)))
        self.tokens, self.slots = [], []
        for index, part in enumerate(encoder.encoders):
            chunks = [encoder.chunks(prompt, {PLACEHOLDER: fake})[index][0] for prompt in prompts]
            self.tokens.append(part.token_tensor(chunks).to(self.device))
            self.slots.append([[fix.offset + 1 for fix in chunk.fixes] for chunk in chunks])
        self.rows: list[tuple] = [() for _ in vectors]
        for index, text_encoder in enumerate(self.family.text_encoders):
            text_encoder.get_input_embeddings().register_forward_hook(self._insert_hook(index, vectors[index]))
        return vectors

    def _insert_hook(self, index: int, vectors) -> Callable:
        def hook(_module, _inputs, output):
            items, positions, which = self.rows[index]
            return output.index_put((items, positions), vectors[which].to(output.dtype))

        return hook

    def _setup_hypernetwork(self, prompts: list[str]) -> list:
        """Encode every prompt once (the text encoder is frozen) and put the hypernetwork's
        modules in front of `to_k` / `to_v` as plain submodules."""
        from tinv_lib.hypernetworks import context_widths, create_hypernetwork, make_options
        from tinv_lib.prompts.encoding import PromptEncoder

        encoder = PromptEncoder.from_pipeline(self.family.pipe)
        with torch.no_grad():
            encoded = [encoder.encode([prompt]) for prompt in prompts]
        self.hidden = torch.cat([e.embeds for e in encoded]).to(self.dtype)
        self.pooled = torch.cat([e.pooled for e in encoded]).to(self.dtype) if encoded[0].pooled is not None else None
        unet = self.family.unet
        network = create_hypernetwork("floor", context_widths(unet), make_options(), seed=self.job.seed)
        network.to(self.device, torch.float32).train()
        for layer in [m for m in unet.modules() if hasattr(m, "set_processor") and isinstance(getattr(m, "to_k", None), torch.nn.Linear)]:
            pair = network.modules_for(layer.to_k.in_features)
            if pair is not None:
                layer.to_k, layer.to_v = _Prefixed(pair[0], layer.to_k), _Prefixed(pair[1], layer.to_v)
        return list(network.parameters())

    def _batch(self) -> tuple:
        """The next batch: image indices and one prompt index per image (cycling)."""
        count, batch = len(self.prompt_of_image), self.job.batch
        images = [(self.step_index * batch + i) % count for i in range(batch)]
        prompts = [self.prompt_of_image[i][self.step_index % len(self.prompt_of_image[i])] for i in images]
        return images, prompts

    def _conditioning(self, prompts: list[int]) -> tuple:
        if self.hypernetwork:
            return self.hidden[prompts], None if self.pooled is None else self.pooled[prompts]
        outputs, pooled = [], None
        for index, text_encoder in enumerate(self.family.text_encoders):
            items, positions, which = [], [], []
            for item, prompt in enumerate(prompts):
                for start in self.slots[index][prompt]:
                    items += [item] * self.job.num_vectors
                    positions += range(start, start + self.job.num_vectors)
                    which += range(self.job.num_vectors)
            self.rows[index] = tuple(torch.tensor(x, device=self.device) for x in (items, positions, which))
            output = text_encoder(self.tokens[index][prompts], output_hidden_states=self.family.is_sdxl)
            outputs.append(output.hidden_states[-2] if self.family.is_sdxl else output[0])
            pooled = getattr(output, "text_embeds", None)
        return torch.cat(outputs, dim=-1), pooled

    def step(self) -> None:
        """One optimizer step of bare work."""

        images, prompts = self._batch()
        family = self.family
        if self.job.options.latent_cache:
            latents = self.latents[images]
        else:
            with torch.no_grad():
                latents = family.vae.encode(self.pixels[images]).latent_dist.sample() * family.latent_scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(images),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            hidden, pooled = self._conditioning(prompts)
            extra = {}
            if family.is_sdxl:
                extra = {"added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids}}
            prediction = family.unet(noisy.to(self.dtype), t, hidden.to(self.dtype), **extra).sample
        loss = F.mse_loss(prediction.float(), family.training_target(self.scheduler, latents, noise, t).float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def round(self) -> dict:
        """Warm-up steps, then the timed steps, by itself: for memory and bytes."""
        clock = StepClock(self.job.warmup, self.device)
        memory_reset(self.device)
        clock(0)
        for step in range(1, self.job.warmup + self.job.steps + 1):
            self.step()
            clock(step)
        frozen = frozen_grad_bytes(self.frozen_modules())
        return _result(clock, self.job, self.device, self.optimizer, self.params, self.grads, frozen)

    def frozen_modules(self) -> list:
        """The base model; for the hypernetwork floor without the modules put into the UNet."""
        modules = [self.family.vae, *self.family.text_encoders]
        trainable = {id(p) for p in self.params}
        return modules + [_Without(self.family.unet, trainable)]


def _bare_optimizer(params: list, eight_bit: bool, weight_decay: float):
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-3, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay)


def _bytes(optimizer, params, grads: GradMeter, frozen: int) -> dict:
    """Optimizer state and gradient bytes of the trainables; gradient bytes on frozen weights."""
    return {"optimizer_bytes": optimizer_state_bytes(optimizer), "grad_bytes": grads.total, "frozen_grad_bytes": frozen,
            "trainable_params": sum(p.numel() for p in params)}


def _result(clock: StepClock, job: Job, device, optimizer, params, grads: GradMeter, frozen: int) -> dict:
    """A run by itself: steps/s (median step), bytes, peak memory."""
    return {"alone_steps_per_s": 1 / statistics.median(clock.durations), **_bytes(optimizer, params, grads, frozen),
            **memory_report(device)}


# ------------------------------------------------------------------------------ trainer


class _OptionsTask:
    """A `TrainingTask` that applies the benchmark's UNet options before the real task's
    set-up (so a hypernetwork wraps the chosen attention processor) and meters gradients.

    For a hypernetwork it also fills the task's prompt cache before step 1. The task encodes
    each distinct prompt once, at first use, and reuses it; a run of thousands of steps pays
    that once per prompt (e.g. 26 template lines x 8 images = 208 encodes), but a 20-step
    timing window would be dominated by it. The fill is timed and reported on its own, and the
    steps are then timed in the steady state the run spends nearly all its time in; the floor
    likewise encodes its prompts before timing.
    """

    def __init__(self, task, options: Options) -> None:
        self._task, self._options = task, options
        self.prompt_cache_seconds: float | None = None
        self.prompt_cache_size = 0

    def setup(self, family, model_info, args, device):
        apply_unet_options(family.unet, self._options)
        step = self._task.setup(family, model_info, args, device)
        self.grads = GradMeter(self._task.parameters())
        return step

    def check_prompts(self, prompts: list[str]) -> None:
        self._task.check_prompts(prompts)
        if self._task.kind == "hypernetwork":
            started = time.perf_counter()
            distinct = list(dict.fromkeys(prompts))
            for prompt in distinct:
                self._task.conditioning([prompt])
            self.prompt_cache_seconds, self.prompt_cache_size = time.perf_counter() - started, len(distinct)

    def __getattr__(self, name: str):
        return getattr(self._task, name)


class Trainer:
    """Our real trainer: `train()` of the training core with the trainer's own arguments and
    task, one whole run (model loading and latent caching included) per round."""

    def __init__(self, job: Job) -> None:
        from tinv_lib.training import loop

        self.job = job
        self.device = _device()
        self.optimizer = None
        self.runs = 0
        build = loop._optimizer

        def capture(params, args, weight_decay):  # the loop keeps its optimizer to itself
            self.optimizer = build(params, args, weight_decay)
            return self.optimizer

        loop._optimizer = capture

    def _argv(self, output: Path) -> list[str]:
        job = self.job
        argv = [
            "--pretrained_model_name_or_path", job.model, "--train_data_dir", job.data, "--output_dir", str(output),
            "--resolution", str(job.resolution), "--train_batch_size", str(job.batch),
            "--max_train_steps", str(job.warmup + job.steps), "--seed", str(job.seed),
            "--mixed_precision", job.options.mixed_precision,
            "--checkpointing_steps", "0", "--save_steps", "0", "--validation_steps", "0",
        ]
        if job.options.gradient_checkpointing:
            argv.append("--gradient_checkpointing")
        if job.options.use_8bit_adam:
            argv.append("--use_8bit_adam")
        if job.task == "ti":
            return argv + ["--placeholder_token", PLACEHOLDER, "--num_vectors", str(job.num_vectors)]
        return argv + ["--hypernetwork_name", PLACEHOLDER]

    def run(self, on_step: Callable[[int], None]) -> _OptionsTask:
        """One training run with `on_step` as the loop's step callback; returns the task."""
        from tinv_lib.training.loop import train

        if self.job.task == "ti":
            from tinv_lib.training.textual_inversion import TextualInversionTask as Task
            from tinv_lib.training.textual_inversion import parse_args
        else:
            from tinv_lib.training.hypernetwork import HypernetworkTask as Task
            from tinv_lib.training.hypernetwork import parse_args
        self.runs += 1
        output = Path(self.job.workdir) / f"out-{self.job.task}-{os.getpid()}-{self.runs}"
        args = parse_args(self._argv(output))
        task = _OptionsTask(Task(args), self.job.options)
        with quiet():
            code = train(args, task, on_step=on_step)
        if code != 0:
            raise RuntimeError(f"{self.job.task}: training ended with exit code {code}")
        return task

    def round(self) -> dict:
        """A run by itself: for memory and bytes."""
        clock = StepClock(self.job.warmup, self.device)
        memory_reset(self.device)
        task = self.run(clock)
        family = task.family
        frozen = frozen_grad_bytes([family.unet, family.vae, *family.text_encoders])
        result = _result(clock, self.job, self.device, self.optimizer, task.parameters(), task.grads, frozen)
        return {**result, "startup_s": clock.warm_seconds}


class Pair:
    """Our trainer and its floor in one process, stepping in turn (see `PairClock`)."""

    def __init__(self, job: Job) -> None:
        self.job, self.device = job, _device()
        self.floor = Floor(job, hypernetwork=job.task == "hn")
        self.trainer = Trainer(job)

    def round(self) -> dict:
        clock = PairClock(self.floor, self.job.warmup, self.device)
        task = self.trainer.run(clock)
        floor_frozen = frozen_grad_bytes(self.floor.frozen_modules())
        ours_frozen = frozen_grad_bytes([task.family.unet, task.family.vae, *task.family.text_encoders])
        return {
            "ours": clock.ours, "floor": clock.floors,
            "bytes": {FLOOR_OF[self.job.task]: _bytes(self.floor.optimizer, self.floor.params, self.floor.grads, floor_frozen),
                      self.job.task: _bytes(self.trainer.optimizer, task.parameters(), task.grads, ours_frozen)},
            "prompt_cache": None if task.prompt_cache_seconds is None else
            {"prompts": task.prompt_cache_size, "seconds": task.prompt_cache_seconds},
        }


def _device() -> torch.device:
    """The device the trainers pick (accelerate: the GPU when there is one)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------- workers


@contextlib.contextmanager
def quiet():
    """Silence the trainers' summaries, progress bars and load-time warnings."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


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


# ------------------------------------------------------------------------------- report

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


# ----------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Training-step benchmark against the physical floor.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="bench")
    parser.add_argument("--resolution", type=int, help="image size (default: the preset's)")
    parser.add_argument("--batch", type=int, help="images per step (default: the preset's)")
    parser.add_argument("--num_vectors", type=int, default=4, help="TI vectors per text encoder")
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, per round (at least 1)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the figures are medians over rounds")
    parser.add_argument("--tasks", default="ti,hn", help="ti, hn or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's choice)")
    opt = parser.add_argument_group("options (the base variant; default: the trainers' defaults)")
    opt.add_argument("--no_latent_cache", action="store_true", help="floor VAE-encodes every step (trainers always cache)")
    opt.add_argument("--gradient_checkpointing", action="store_true")
    opt.add_argument("--no_sdpa", action="store_true", help="plain AttnProcessor instead of torch SDPA")
    opt.add_argument("--channels_last", action="store_true", help="UNet in channels_last memory format")
    opt.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    opt.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--variants", default="default",
                        help="comma-separated variants on top of the base (write --variants=... when the first "
                             "starts with '-'): default, +gradient_checkpointing (+gc), -sdpa, +8bit, +compile, "
                             "+channels_last, -latent_cache, bf16, fp16, or combinations like +gc+8bit")
    parser.add_argument("--sweep", action="store_true", help="the base, then each option flipped by itself")
    parser.add_argument("--no_memory", action="store_true", help="skip the runs by itself (peak memory, bytes)")
    parser.add_argument("--workdir", help="keep the built model and images here (reused by later runs)")
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--inline", action="store_true", help="no worker processes (smoke tests; memory mixed)")
    return parser


def base_options(args: argparse.Namespace) -> Options:
    return Options(latent_cache=not args.no_latent_cache, gradient_checkpointing=args.gradient_checkpointing,
                   sdpa=not args.no_sdpa, channels_last=args.channels_last, compile=args.compile,
                   use_8bit_adam=args.use_8bit_adam, mixed_precision=args.mixed_precision)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--warmup, --steps and --repeats must be at least 1")
    base = base_options(args)
    variants = sweep_variants(base) if args.sweep else [parse_variant(v.strip(), base) for v in args.variants.split(",") if v.strip()]
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks or set(tasks) - set(FLOOR_OF):
        raise SystemExit("--tasks: ti, hn or ti,hn")
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        return run(args, variants, tasks, workdir, "python benchmarks/bench_train.py " + " ".join(argv))


def run(args: argparse.Namespace, variants: list[Options], tasks: list[str], workdir: Path, command: str) -> int:
    """Build the model and images, measure, print the table and the checks."""
    preset = PRESETS[args.preset]
    preset = replace(preset, resolution=args.resolution or preset.resolution, batch=args.batch or preset.batch)
    started = time.perf_counter()
    model = prepare_model(preset, args.seed, workdir)
    data = prepare_images(workdir / f"images-{preset.resolution}", max(args.images, preset.batch), preset.resolution)
    jobs = [Job("pair", task, options, str(model), str(data), preset, preset.batch, preset.resolution,
                args.num_vectors, args.warmup, args.steps, args.seed, str(workdir), args.threads)
            for options in variants for task in tasks]
    print(f"preset {preset.name} ({preset.about}); {preset.resolution} px, batch {preset.batch}, "
          f"{args.num_vectors} TI vectors; {args.repeats} rounds of {args.warmup}+{args.steps} steps; "
          f"{args.threads or torch.get_num_threads()} torch threads", flush=True)
    rows = measure(jobs, args.repeats, args.inline, not args.no_memory, lambda line: print(line, flush=True))
    summaries = [line for row in rows for line in row.summaries(next(r for r in rows if r.task == row.task))]
    machine = machine_description()
    print(f"\nmachine: {machine}\ncommand: {command}\nwall time: {time.perf_counter() - started:.0f} s\n")
    print(format_table(summaries, torch.cuda.is_available()))
    print()
    checks = acceptance_lines(summaries, {"ti": 1.15, "hn": 1.2})
    for line in byte_lines(summaries, preset, args.num_vectors) + prompt_cache_lines(summaries) + checks:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": asdict(preset), "machine": machine, "command": command,
                                               "results": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
