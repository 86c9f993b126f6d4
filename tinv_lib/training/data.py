"""Training data: images, captions, prompt templates, buckets, cached latents, batch order.

A1111 semantics (docs/formats.md, "Captions and prompt templates", "Latent sampling"): `.txt`
caption sidecars read raw, otherwise the file
stem without its leading `[-\\d]+\\s*` (or the `--filename_word_regex` words); template lines with
`[name]` and `[filewords]` (tags joined by `','`), tag dropout and shuffle; latents encoded once
and kept in RAM (`once` / `deterministic` / `random` sampling); PNG alpha as loss weight.
Beyond A1111: non-square images go to aspect buckets (or are centre-cropped), flipping, an
optional on-disk latent cache, and OneTrainer-style `<stem>-masklabel.png` loss masks.

Everything random here is a pure function of `(seed, micro-batch index, sample position)`, so
a resumed run sees exactly the batches, prompts, flips and latent samples of an uninterrupted one
without saving any RNG state, and N processes see what one process with N times the batch sees.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tinv_lib.common.errors import TinvError
from tinv_lib.common.images import IMAGE_SUFFIXES, UnreadableImage, read_image

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
BUILTIN_TEMPLATES = sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt"))
FILENAME_PREFIX = re.compile(r"^[-\d]+\s*")
MASK_SUFFIX = "-masklabel.png"  # OneTrainer's name: white = the concept, black = not


class DatasetError(TinvError):
    """The training data cannot be used as given."""


# ------------------------------------------------------------------------------ text side


def load_template(name_or_path: str) -> list[str]:
    """Template lines from a built-in name (`subject`, `style_filewords`, ...) or a file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATES_DIR / f"{name_or_path.removesuffix('.txt')}.txt"
    if not path.is_file():
        raise DatasetError(
            f"template {name_or_path!r} not found: give a file path or one of {', '.join(BUILTIN_TEMPLATES)}"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"template {path} has no lines")
    return lines


def caption_for(image_path: Path, word_regex: str = "", join_string: str = " ") -> str:
    """A1111's caption: the raw `.txt` sidecar, else words from the file name."""
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8")
    stem = FILENAME_PREFIX.sub("", image_path.stem)
    if word_regex:
        return join_string.join(re.findall(word_regex, stem))
    return stem


def build_prompt(
    template: str, caption: str, placeholder: str, rng: random.Random, shuffle_tags: bool, tag_dropout: float
) -> str:
    """A1111 `create_text`: tags = caption split on ',', optional dropout then shuffle,
    `[filewords]` = tags joined by ',' (no space added), `[name]` = the placeholder."""
    tags = caption.split(",")
    if tag_dropout > 0:
        tags = [tag for tag in tags if rng.random() > tag_dropout]
    if shuffle_tags:
        rng.shuffle(tags)
    return template.replace("[filewords]", ",".join(tags)).replace("[name]", placeholder)


# ----------------------------------------------------------------------------- image side


def bucket_size(width: int, height: int, resolution: int, multiple: int, mode: str) -> tuple[int, int]:
    """Training size for an image: square for `crop`/`stretch`; for `buckets`, the size of
    about `resolution²` pixels (sides multiples of `multiple`) closest in aspect ratio."""
    if mode != "buckets" or width == height:
        return resolution, resolution
    aspect = width / height
    best, best_error = (resolution, resolution), float("inf")
    side = multiple
    while side <= resolution * 2:
        other = max(multiple, (resolution * resolution // side) // multiple * multiple)
        for candidate in ((side, other), (other, side)):
            error = abs(math.log(candidate[0] / candidate[1]) - math.log(aspect))
            if error < best_error - 1e-9:
                best, best_error = candidate, error
        side += multiple
    return best


def _fit(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """Resize to `size`: `stretch` ignores the aspect ratio (A1111); otherwise scale to cover
    and crop the centre."""
    if mode == "stretch":
        return image.resize(size, Image.BICUBIC)
    return ImageOps.fit(image, size, Image.BICUBIC, centering=(0.5, 0.5))


def alpha_weight(alpha: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """A1111's loss weight from the alpha channel: resized to the latent grid, shifted to min 0
    and scaled to mean 1 (all ones when the alpha is constant)."""
    weight = torch.from_numpy(np.asarray(alpha.resize(latent_size, Image.BICUBIC), dtype=np.float32))
    weight = weight - weight.min()
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones_like(weight)


# ------------------------------------------------------------------------------ loss masks


@dataclass(frozen=True)
class MaskOptions:
    """Where mask files live and how much the area outside a mask counts.

    `unmasked_weight` None means the flag was not given: mask files then use 0, and the alpha
    channel keeps A1111's rule (`alpha_weight`); given, the alpha channel is a mask like a file.
    """

    mask_dir: Path | None = None
    unmasked_weight: float | None = None

    @property
    def outside(self) -> float:
        return 0.0 if self.unmasked_weight is None else self.unmasked_weight


def is_mask_file(path: Path) -> bool:
    """Mask files sit beside the images they belong to and must never be trained on as images."""
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_path(image_path: Path, mask_dir: Path | None) -> Path:
    """`<stem>-masklabel.png` in `mask_dir`, or beside the image when no folder is given."""
    return (mask_dir or image_path.parent) / f"{image_path.stem}{MASK_SUFFIX}"


def read_mask(path: Path, image_size: tuple[int, int]) -> tuple[Image.Image | None, str | None]:
    """The mask as greyscale at the image's size, and a notice line when it is unusable as is.

    A bad mask costs only its own mask: unreadable means the image trains unmasked, a different
    size is resized to the image (both said in the notice) rather than failing the run.
    """
    try:
        mask = read_image(path).convert("L")
    except UnreadableImage as error:
        return None, f"{path.name}: unreadable mask ({error}); its image trains unmasked"
    if mask.size == image_size:
        return mask, None
    note = (f"{path.name}: mask is {mask.width}x{mask.height}, its image {image_size[0]}x{image_size[1]}; "
            "resized to the image")
    return mask.resize(image_size, Image.BILINEAR), note


def mask_weight(mask: Image.Image, size: tuple[int, int], aspect_mode: str, latent_size: tuple[int, int],
                outside: float) -> torch.Tensor | None:
    """Loss weight `outside + (1 - outside) * mask` on the latent grid, scaled to mean 1.

    The mask is fitted exactly like the image (`_fit`), then area-averaged onto the latent grid
    (no ringing: a cell wholly outside the mask gets exactly `outside`). Mean 1 makes the loop's
    `mean(weight * error)` equal `sum(weight * error) / sum(weight)` per image, so a small mask
    does not shrink the loss. None when the weight is zero everywhere (nothing to learn).
    """
    fitted = _fit(mask, size, aspect_mode).resize(latent_size, Image.BOX)
    inside = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)
    weight = outside + (1.0 - outside) * inside
    mean = weight.mean()
    return weight / mean if mean > 0 else None


def given_mask_weight(mask: Image.Image, name: str, size: tuple[int, int], aspect_mode: str,
                      latent_size: tuple[int, int], masks: MaskOptions) -> tuple[torch.Tensor | None, list[str]]:
    """The loss weight of a mask already read at its image's size (a mask file, or a dataset's
    mask column), and a notice when it leaves nothing to learn, so the image trains unmasked."""
    weight = mask_weight(mask, size, aspect_mode, latent_size, masks.outside)
    if weight is not None:
        return weight, []
    return None, [f"{name}: mask is black over the whole training crop and --unmasked_weight is 0; "
                  "its image trains unmasked"]


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _image_weight(
    path: Path, image: Image.Image, size: tuple[int, int], aspect_mode: str, latent_size: tuple[int, int],
    use_alpha: bool, masks: MaskOptions,
) -> tuple[torch.Tensor | None, bool, list[str]]:
    """(loss weight or None, whether a mask file was found, notice lines) for one image.

    A mask file wins over the alpha channel; without one, the alpha channel weights the loss
    when `use_alpha` is on.
    """
    source = mask_path(path, masks.mask_dir)
    if source.is_file():
        mask, note = read_mask(source, image.size)
        notes = [note] if note else []
        if mask is None:
            return None, True, notes
        weight, more = given_mask_weight(mask, source.name, size, aspect_mode, latent_size, masks)
        return weight, True, notes + more
    return alpha_channel_weight(image, size, aspect_mode, latent_size, use_alpha, masks), False, []


def alpha_channel_weight(image: Image.Image, size: tuple[int, int], aspect_mode: str, latent_size: tuple[int, int],
                         use_alpha: bool, masks: MaskOptions) -> torch.Tensor | None:
    """The loss weight from the alpha channel for an image without a mask (None: no weight):
    A1111's rule, or a mask like a file once `--unmasked_weight` is given."""
    if not (use_alpha and _has_alpha(image)):
        return None
    if masks.unmasked_weight is None:
        alpha = _fit(image.convert("RGBA"), size, aspect_mode).getchannel("A")
        return alpha_weight(alpha, latent_size)
    alpha = image.convert("RGBA").getchannel("A")
    return mask_weight(alpha, size, aspect_mode, latent_size, masks.outside)


def _mask_summary(masked: int, weighted: int, total: int, masks: MaskOptions) -> list[str]:
    """One line counting the images that train with weight 1 everywhere in a masked dataset (or
    saying that --unmasked_weight found nothing to apply to)."""
    where = f"in {masks.mask_dir}" if masks.mask_dir is not None else "beside the image"
    if masked == 0 and masks.mask_dir is None:
        if masks.unmasked_weight is not None and weighted == 0:
            return [f"--unmasked_weight {masks.unmasked_weight}: no mask files (<stem>{MASK_SUFFIX} {where}) "
                    "and no alpha weights; it has no effect"]
        return []
    plain = total - weighted
    if plain == 0:
        return []
    return [f"{plain} of {total} images have no usable mask (<stem>{MASK_SUFFIX} {where}): "
            "they train with weight 1 everywhere"]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def training_pixels(image: Image.Image, size: tuple[int, int], aspect_mode: str) -> torch.Tensor:
    """The image as the VAE encodes it: RGB fitted to its training size, [3, H, W] in [-1, 1]."""
    return _to_tensor(_fit(image.convert("RGB"), size, aspect_mode))


@dataclass
class TrainingImage:
    """One training image after loading: where it came from, its caption and training size."""

    path: Path
    caption: str
    size: tuple[int, int]
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    weight: torch.Tensor | None  # [H/f, W/f] loss weight (mask file or alpha), mean 1, or None
    cache_id: str = ""  # a dataset row's identity for the latent cache; files use their path, size and mtime
    latents: dict[bool, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # flip -> (mean, std)


def load_images(
    data_dir: Path, resolution: int, multiple: int, aspect_mode: str, use_alpha: bool, latent_factor: int,
    word_regex: str = "", join_string: str = " ", masks: MaskOptions | None = None,
) -> tuple[list[TrainingImage], list[str], list[str]]:
    """Every readable image in `data_dir` (not recursive, sorted; `*-masklabel.png` files are
    masks, never images), one line per skipped file, and one notice line per mask problem."""
    if not data_dir.is_dir():
        raise DatasetError(f"--train_data_dir {data_dir}: no such folder")
    masks = masks or MaskOptions()
    images: list[TrainingImage] = []
    skipped: list[str] = []
    notices: list[str] = []
    masked = 0
    for path in sorted(data_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith(".") or is_mask_file(path):
            continue
        try:
            image = read_image(path)
        except UnreadableImage as error:
            skipped.append(f"{path.name}: {error}")
            continue
        size = bucket_size(image.width, image.height, resolution, multiple, aspect_mode)
        latent_size = (size[0] // latent_factor, size[1] // latent_factor)
        weight, has_mask, notes = _image_weight(path, image, size, aspect_mode, latent_size, use_alpha, masks)
        masked += has_mask
        notices += notes
        pixels = training_pixels(image, size, aspect_mode)
        images.append(TrainingImage(path, caption_for(path, word_regex, join_string), size, pixels, weight))
    if not images:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise DatasetError(f"--train_data_dir {data_dir}: no usable images{detail}")
    weighted = sum(image.weight is not None for image in images)
    return images, skipped, notices + _mask_summary(masked, weighted, len(images), masks)


# ---------------------------------------------------------------------------- latents


def _cache_key(image: TrainingImage, flip: bool, model_id: str) -> str:
    source = image.cache_id
    if not source:
        stat = image.path.stat()
        source = f"{image.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    text = f"{source}|{image.size}|{flip}|{model_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@torch.no_grad()
def encode_latents(
    images: list[TrainingImage], vae, flips: tuple[bool, ...], device: torch.device, dtype: torch.dtype,
    disk_cache: Path | None = None, model_id: str = "",
) -> None:
    """Encode every image (and its mirror when flipping is on) once; keep the posterior's mean
    and std on the CPU. On-disk cache entries are keyed by file, size, flip and model."""
    from safetensors.torch import load_file, save_file

    from tinv_lib.common.atomic import atomic_path

    for image in images:
        for flip in flips:
            cached = disk_cache / f"{_cache_key(image, flip, model_id)}.safetensors" if disk_cache else None
            if cached is not None and cached.is_file():
                loaded = load_file(str(cached))
                image.latents[flip] = (loaded["mean"], loaded["std"])
                continue
            pixels = image.pixels.flip(-1) if flip else image.pixels
            posterior = vae.encode(pixels[None].to(device, dtype)).latent_dist
            mean, std = posterior.mean[0].float().cpu(), posterior.std[0].float().cpu()
            image.latents[flip] = (mean, std)
            if cached is not None:
                with atomic_path(cached) as tmp:
                    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp))


def sample_latent(
    mean: torch.Tensor, std: torch.Tensor, mode: str, once_noise: torch.Tensor, step_noise: torch.Tensor
) -> torch.Tensor:
    """`deterministic`: the mean; `once`: one fixed sample per image; `random`: a fresh sample."""
    if mode == "deterministic":
        return mean
    return mean + std * (once_noise if mode == "once" else step_noise)


# ---------------------------------------------------------------------------- batch order


class Stream(IntEnum):
    """The purposes a random number is drawn for: each is an independent stream of `seeded`."""

    EPOCH_ORDER = 1  # per epoch: the order of the batches (`epoch_batches`)
    NOISE_AND_TIMESTEP = 2  # per sample: the noise, then the timestep, from one generator
    PROMPT = 3  # per sample: the template line, tag shuffling and tag dropout
    LATENT_FRESH = 4  # per sample: `--latent_sampling random`
    LATENT_ONCE = 5  # per image and flip: `--latent_sampling once`, the same for the whole run
    FLIP = 6  # per sample: `--flip_p`
    TORCH_GLOBAL = 7  # per micro-batch and rank: torch's global generator (dropout in the modules)
    NOISE_OFFSET = 8  # per sample: `--noise_offset`
    CAPTION_DROPOUT = 9  # per sample: `--caption_dropout`
    VALIDATION = 10  # per held-out image: the fixed noise of the validation loss
    VALIDATION_SPLIT = 11  # once: which images `--validation_split` holds out



def seeded(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams per (seed, purpose, index, ...)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_batches(sizes: list[tuple[int, int]], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Same-size batches of `batch` images for one epoch (A1111 groups by size too).

    Each size group is shuffled and cut into full batches (drop-last); the batches are then
    shuffled. Deterministic from `(seed, epoch)`.
    """
    rng = random.Random(seeded(seed, Stream.EPOCH_ORDER, epoch))
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    batches: list[list[int]] = []
    for size in sorted(groups):
        members = groups[size][:]
        rng.shuffle(members)
        batches += [members[i:i + batch] for i in range(0, len(members) - batch + 1, batch)]
    rng.shuffle(batches)
    return batches


@dataclass
class BatchPlan:
    """Which global batch the `k`-th micro-batch of the run is.

    A1111 drops micro-batches left over at an epoch's end when accumulating: an epoch gives
    `(batches // accumulation) * accumulation` micro-batches.
    """

    sizes: list[tuple[int, int]]
    global_batch: int
    accumulation: int
    seed: int

    def __post_init__(self) -> None:
        count = len(epoch_batches(self.sizes, self.global_batch, self.seed, 0))
        self.micro_batches_per_epoch = (count // self.accumulation) * self.accumulation
        if self.micro_batches_per_epoch == 0:
            raise DatasetError(
                f"no image size has {self.global_batch} images for one batch "
                f"(x{self.accumulation} accumulation): lower --train_batch_size or "
                "--gradient_accumulation_steps, or use --aspect_mode crop"
            )
        self.steps_per_epoch = self.micro_batches_per_epoch // self.accumulation
        self._epoch_cache: tuple[int, list[list[int]]] = (-1, [])

    def describe(self) -> str:
        """The plan for the run's opening line."""
        return f"{len(self.sizes)} images, {self.steps_per_epoch} steps per epoch"

    def stream_state(self) -> None:
        """Nothing for a checkpoint: the batch order is a function of the step (`StreamPlan` has one)."""
        return None

    def batch(self, micro_index: int) -> tuple[int, list[int]]:
        """(epoch, image indices of the global batch) for micro-batch number `micro_index`."""
        epoch, position = divmod(micro_index, self.micro_batches_per_epoch)
        if self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(self.sizes, self.global_batch, self.seed, epoch))
        return epoch, self._epoch_cache[1][position]
