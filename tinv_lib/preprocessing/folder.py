"""A1111's "Preprocess images" as a Hugging Face `datasets` pipeline: source folder → destination.

The source folder is listed as A1111 lists it (sorted case-insensitively, hidden files skipped);
each file becomes one row of a `datasets.Dataset`, and `Dataset.map` (with `num_proc` worker
processes) turns a batch of rows into output images and captions on disk:

1. open the file, apply its EXIF orientation, convert to RGB (unreadable files are skipped with
   the reason);
2. make the outputs in A1111's order — split tiles, focal crop, auto-sized crop, the original —
   or, when none of those applies, the default "crop and resize"; each followed by its mirror
   image with `flip` (docs/preprocess.md, "What happens to each file");
3. caption every output with the image-to-text model, merge with the source's existing caption;
4. write `<index:05>-<subindex>-<source stem>.png` (or `<index:05>-<subindex>-<caption>.png`)
   and the `.txt` caption, atomically, then record the source as finished
   (`tinv_lib.preprocessing.state`), so a re-run on the same destination skips it.

The map returns one row per source (status, reason, files written), which becomes the summary.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from tinv_lib.common.atomic import atomic_path, atomic_write_text
from tinv_lib.common.errors import TinvError, first_line
from tinv_lib.common.images import UNREADABLE, UnreadableImage, read_image
from tinv_lib.preprocessing import state
from tinv_lib.preprocessing.captioning import (
    EXISTING_CAPTION_ACTIONS,
    CaptionSettings,
    check_caption_model,
    filename_caption,
    get_captioner,
    merge_caption,
)
from tinv_lib.preprocessing.focal_crop import FaceDetector, FocalWeights, focal_crop, load_face_detector
from tinv_lib.preprocessing.image_ops import (
    AutosizeSettings,
    centre_crop_resize,
    choose_autosize,
    crop_and_resize,
    plan_split,
    split_image,
    to_rgb,
)

CAPTION_OUTPUTS = ("txt", "filename")
CAPTION_SUFFIX = ".txt"
# reasons for skipping a source, as the summary counts them
ALREADY_DONE = "already done"  # and the image reader's NOT_AN_IMAGE and UNREADABLE
NO_AUTOSIZE = "no auto-size fits"


@dataclass(frozen=True)
class PreprocessOptions:
    """Everything `preprocess.py` can be asked to do (see docs/preprocess.md for each option)."""

    source_dir: str
    dest_dir: str
    width: int = 512
    height: int = 512
    existing_caption: str = "ignore"
    keep_original_size: bool = False
    flip: bool = False
    split: bool = False
    split_threshold: float = 0.5
    split_overlap: float = 0.2
    focal_crop: bool = False
    focal_weights: FocalWeights = field(default_factory=FocalWeights)
    face_model: str | None = None
    autosize: bool = False
    autosize_settings: AutosizeSettings = field(default_factory=AutosizeSettings)
    caption: CaptionSettings | None = None
    caption_output: str = "txt"
    num_proc: int = 1
    batch_size: int = 8


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


@dataclass
class PreprocessSummary:
    """What one run did: files read, files written, and every skipped source with its reason."""

    read: int = 0
    images_written: int = 0
    captions_written: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, reason, detail)

    def skip_lines(self) -> list[str]:
        """One line per skipped source that needs the user's attention (not "already done")."""
        return [
            f"skipped {name}: {reason}" + (f" ({detail})" if detail else "")
            for name, reason, detail in self.skipped
            if reason != ALREADY_DONE
        ]

    def line(self) -> str:
        """The one-line summary: read, written, skipped by reason."""
        counts = Counter(reason for _, reason, _ in self.skipped)
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
        text = (
            f"preprocess: {_count(self.read, 'file')} read, {_count(self.images_written, 'image')} and "
            f"{_count(self.captions_written, 'caption')} written, {len(self.skipped)} skipped"
        )
        return text + (f" ({reasons})" if reasons else "")


class SkipSource(Exception):
    """A source file we cannot use; carries the reason for the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Checking options and listing the source folder
# ---------------------------------------------------------------------------------------------


def validate_options(options: PreprocessOptions) -> None:
    """Raise `TinvError` (one line) for options that cannot work, before any file is touched."""
    source, dest = Path(options.source_dir), Path(options.dest_dir)
    if not source.is_dir():
        raise TinvError(f"--source_dir {source}: no such folder")
    if dest.exists() and not dest.is_dir():
        raise TinvError(f"--dest_dir {dest}: exists and is not a folder")
    if source.resolve() == dest.resolve():
        raise TinvError("--source_dir and --dest_dir must be different folders")
    if options.width <= 0 or options.height <= 0:
        raise TinvError(f"--width/--height must be positive, got {options.width}x{options.height}")
    if options.existing_caption not in EXISTING_CAPTION_ACTIONS:
        raise TinvError(f"--existing_caption must be one of {', '.join(EXISTING_CAPTION_ACTIONS)}")
    if options.caption_output not in CAPTION_OUTPUTS:
        raise TinvError(f"--caption_output must be one of {', '.join(CAPTION_OUTPUTS)}")
    if options.num_proc < 1 or options.batch_size < 1:
        raise TinvError("--num_proc and --batch_size must be at least 1")
    sizes = options.autosize_settings
    if options.autosize and (sizes.min_dim <= 0 or sizes.max_dim < sizes.min_dim):
        raise TinvError("--autosize_min_dim must be positive and not above --autosize_max_dim")
    if options.autosize and sizes.objective not in ("area", "error"):
        raise TinvError("--autosize_objective must be 'area' or 'error'")
    if options.caption is not None:
        check_caption_model(options.caption.model)
        if options.caption.max_tokens < 1 or options.caption.min_tokens < 0:
            raise TinvError("--caption_max_tokens must be at least 1 and --caption_min_tokens at least 0")
    if options.focal_crop and options.face_model:
        load_face_detector(options.face_model)


def list_source_files(source_dir: str | os.PathLike) -> list[str]:
    """File names in `source_dir` in A1111's order: sorted case-insensitively, no hidden files.

    A file's position in this list is its output index, so caption `.txt` files and other
    non-images take up numbers too, exactly as in A1111.
    """
    folder = Path(source_dir)
    names = sorted((name for name in os.listdir(folder) if not name.startswith(".")), key=str.lower)
    return [name for name in names if (folder / name).is_file()]


def is_candidate(name: str) -> bool:
    """Caption sidecars are inputs to other images, not images to try and report."""
    return not name.lower().endswith(CAPTION_SUFFIX)


# ---------------------------------------------------------------------------------------------
# One source image → output images
# ---------------------------------------------------------------------------------------------


def load_source_image(path: Path) -> Image.Image:
    """`path` read by the one image reader (`tinv_lib.common.images`), as 8-bit RGB; `SkipSource`
    with the reader's reason when it cannot be read or converted."""
    try:
        return to_rgb(read_image(path))
    except UnreadableImage as error:
        raise SkipSource(error.reason, error.detail) from None
    except Exception as error:  # noqa: BLE001 - a colour mode that cannot be converted skips this file only
        raise SkipSource(UNREADABLE, first_line(error)) from None


def make_outputs(
    image: Image.Image, options: PreprocessOptions, face_detector: FaceDetector | None = None
) -> list[Image.Image]:
    """All output images of one source, in A1111's order and with its subindex numbering.

    Split tiles, the focal crop (non-square images only), the auto-sized crop and the original
    size add up; the default "crop and resize" is used only when none of them was asked for or
    applied (a requested auto-sized crop counts even when no size fits, as in A1111). With
    `flip`, every output is followed by its mirror image.
    """
    width, height = options.width, options.height
    outputs: list[Image.Image] = []
    default_resize = True
    if options.split:
        plan = plan_split(image.width, image.height, width, height, options.split_threshold, options.split_overlap)
        if plan is not None:
            outputs.extend(split_image(image, width, height, plan))
            default_resize = False
    if options.focal_crop and image.width != image.height:
        outputs.append(focal_crop(image, width, height, options.focal_weights, face_detector))
        default_resize = False
    if options.autosize:
        size = choose_autosize(image.width, image.height, options.autosize_settings)
        if size is not None:
            outputs.append(centre_crop_resize(image, *size))
        default_resize = False
    if options.keep_original_size:
        outputs.append(image)
        default_resize = False
    if default_resize:
        outputs.append(crop_and_resize(image, width, height))
    if options.flip:
        outputs = [shown for output in outputs for shown in (output, ImageOps.mirror(output))]
    return outputs


# ---------------------------------------------------------------------------------------------
# The datasets map: a batch of sources → files on disk
# ---------------------------------------------------------------------------------------------


def output_settings(options: PreprocessOptions) -> dict[str, Any]:
    """The options that shape the outputs (not where or how fast they are made)."""
    settings = asdict(options)
    for key in ("source_dir", "dest_dir", "num_proc", "batch_size"):
        settings.pop(key)
    if options.caption is not None:
        settings["caption"] = {
            "model": str(Path(options.caption.model).resolve()),
            "prompt": options.caption.prompt,
            "min_tokens": options.caption.min_tokens,
            "max_tokens": options.caption.max_tokens,
        }
    return settings


@lru_cache(maxsize=4)
def _face_detector(path: str | None) -> FaceDetector | None:
    """One face detector per worker process, made on first use."""
    return load_face_detector(path) if path else None


@dataclass
class _Plan:
    """One source on its way through the batch: loaded outputs, or why there are none."""

    index: int
    name: str
    status: str = "todo"  # todo | done | skipped
    reason: str = ""
    detail: str = ""
    images: list[Image.Image] = field(default_factory=list)
    existing: str | None = None
    signature: dict[str, Any] = field(default_factory=dict)
    old_record: dict[str, Any] | None = None


def _read_existing_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _plan_source(index: int, name: str, options: PreprocessOptions, settings: str) -> _Plan:
    """Load one source and make its output images, unless it is finished or unusable."""
    source = Path(options.source_dir) / name
    dest = Path(options.dest_dir)
    caption_file = source.with_suffix(CAPTION_SUFFIX) if options.existing_caption != "ignore" else None
    plan = _Plan(index, name, signature=state.source_signature(source, caption_file))
    plan.old_record = state.read_record(dest, index)
    if state.is_finished(plan.old_record, dest, plan.signature, settings):
        plan.status, plan.reason = "done", ALREADY_DONE
        return plan
    try:
        image = load_source_image(source)
    except SkipSource as skip:
        plan.status, plan.reason, plan.detail = "skipped", skip.reason, skip.detail
        return plan
    detector = _face_detector(options.face_model) if options.focal_crop else None
    plan.images = make_outputs(image, options, detector)
    if not plan.images:
        plan.status, plan.reason = "skipped", NO_AUTOSIZE
        plan.detail = f"{image.width}x{image.height} has no size within the aspect-error threshold"
    if caption_file is not None and caption_file.is_file():
        plan.existing = _read_existing_caption(caption_file)
    return plan


def _caption_settings_for_worker(options: PreprocessOptions) -> CaptionSettings | None:
    """Share the CPU between worker processes instead of each using every core."""
    if options.caption is None or options.num_proc <= 1:
        return options.caption
    return replace(options.caption, threads=max(1, (os.cpu_count() or 1) // options.num_proc))


def _save_png(image: Image.Image, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    except OSError as error:
        raise TinvError(f"cannot write {path}: {error.strerror or first_line(error)}") from None


def _write_outputs(plan: _Plan, captions: list[str], options: PreprocessOptions, settings: str) -> list[str]:
    """Write one source's images and captions, then its record. Returns the file names written."""
    dest = Path(options.dest_dir)
    stem = Path(plan.name).stem
    written: list[str] = []
    for subindex, (image, generated) in enumerate(zip(plan.images, captions)):
        caption = merge_caption(generated, plan.existing, options.existing_caption)
        prefix = f"{plan.index:05}-{subindex}"
        label = filename_caption(caption, dest, prefix) if options.caption_output == "filename" else ""
        base = f"{prefix}-{label or stem}"
        _save_png(image, dest / f"{base}.png")
        written.append(f"{base}.png")
        if caption and options.caption_output == "txt":
            try:
                atomic_write_text(dest / f"{base}{CAPTION_SUFFIX}", caption)
            except OSError as error:
                raise TinvError(f"cannot write {dest / base}{CAPTION_SUFFIX}: {error.strerror}") from None
            written.append(f"{base}{CAPTION_SUFFIX}")
    state.remove_stale(dest, plan.old_record, set(written))
    state.write_record(dest, plan.index, plan.signature, settings, written)
    return written


def process_batch(batch: dict[str, list], options: PreprocessOptions, settings: str) -> dict[str, list]:
    """The `Dataset.map` function: plan every source of the batch, caption all new outputs in one
    call, write the files. Returns per source: status, reason, detail, files written, counts."""
    plans = [_plan_source(i, n, options, settings) for i, n in zip(batch["index"], batch["name"])]
    pending = [image for plan in plans if plan.status == "todo" for image in plan.images]
    caption_settings = _caption_settings_for_worker(options)
    if caption_settings is not None and pending:
        generated = iter(get_captioner(caption_settings)(pending))
    else:
        generated = iter([""] * len(pending))
    result: dict[str, list] = {key: [] for key in ("status", "reason", "detail", "outputs", "images", "captions")}
    for plan in plans:
        outputs: list[str] = []
        if plan.status == "todo":
            captions = [next(generated) for _ in plan.images]
            outputs = _write_outputs(plan, captions, options, settings)
            plan.status = "written"
        result["status"].append(plan.status)
        result["reason"].append(plan.reason)
        result["detail"].append(plan.detail)
        result["outputs"].append(outputs)
        result["images"].append(sum(name.endswith(".png") for name in outputs))
        result["captions"].append(sum(name.endswith(CAPTION_SUFFIX) for name in outputs))
        plan.images = []
    return result


def preprocess_folder(options: PreprocessOptions) -> PreprocessSummary:
    """Run the whole preprocessing job and return its summary (see the module docstring)."""
    validate_options(options)
    from datasets import Dataset, Features, List, Value

    names = list_source_files(options.source_dir)
    rows = [(index, name) for index, name in enumerate(names) if is_candidate(name)]
    summary = PreprocessSummary(read=len(rows))
    if not rows:
        return summary
    Path(options.dest_dir).mkdir(parents=True, exist_ok=True)
    settings = state.settings_hash(output_settings(options))
    sources = Dataset.from_dict({"index": [i for i, _ in rows], "name": [n for _, n in rows]})
    features = Features(
        {
            "index": Value("int64"),
            "name": Value("string"),
            "status": Value("string"),
            "reason": Value("string"),
            "detail": Value("string"),
            "outputs": List(Value("string")),
            "images": Value("int64"),
            "captions": Value("int64"),
        }
    )
    fingerprint = hashlib.sha256(f"{settings}{options.dest_dir}{names}".encode()).hexdigest()[:16]
    results = sources.map(
        process_batch,
        fn_kwargs={"options": options, "settings": settings},
        batched=True,
        batch_size=options.batch_size,
        num_proc=options.num_proc if options.num_proc > 1 else None,
        features=features,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc="Preprocessing",
    )
    for row in results:
        summary.images_written += row["images"]
        summary.captions_written += row["captions"]
        if row["status"] in ("done", "skipped"):
            summary.skipped.append((row["name"], row["reason"], row["detail"]))
    return summary
