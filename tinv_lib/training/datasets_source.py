"""Training data from Hugging Face `datasets` (`--dataset_name`): read whole, or streamed.

What `--dataset_name` names, tried in this order (docs/training.md, "Training from a dataset"):
a `save_to_disk` folder; a folder of data files (parquet, arrow, jsonl, csv, webdataset `.tar`
shards, or images with a `metadata.jsonl`: `datasets` picks the loader from what is there); a
file or glob of data files (the loader from the suffix); otherwise a hub id, read from the local
cache when the machine is offline.

Read whole, a dataset gives the records a folder gives (`TrainingImage`, rows in dataset order):
the caption column is the `.txt` sidecar, the mask column the `-masklabel.png`, and buckets,
batch order, flips, the validation split and the latent cache (keyed by the dataset's
fingerprint and the row) are the folder's.

Streamed (`--streaming`), nothing is read up front: `StreamPlan` reads each micro-batch's rows
when the loop asks for it and encodes their latents then, so memory holds one micro-batch of
images whatever the size of the set.
"""

from __future__ import annotations

import glob
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tinv_lib.common.errors import ArgumentError
from tinv_lib.common.images import NOT_AN_IMAGE, UnreadableImage, read_image
from tinv_lib.training.data import (
    DatasetError,
    MaskOptions,
    TrainingImage,
    alpha_channel_weight,
    bucket_size,
    given_mask_weight,
    read_mask,
    training_pixels,
)

# data files `datasets` can read, by suffix: the loader for a file or glob given as --dataset_name
DATA_FILE_LOADERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv",
                     ".tar": "webdataset"}


@dataclass(frozen=True)
class DatasetSpec:
    """What the `--dataset_*` flags ask for."""

    name: str
    config: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"  # "" for none: every caption is empty
    mask_column: str | None = None
    cache_dir: str | None = None
    streaming: bool = False

    @classmethod
    def from_args(cls, args) -> DatasetSpec:
        return cls(args.dataset_name, args.dataset_config_name, args.dataset_split, args.image_column,
                   args.caption_column, args.mask_column, args.cache_dir, args.streaming)


@dataclass(frozen=True)
class ImageSettings:
    """How a row's image becomes a training record: the folder reader's flags, and the model's
    size multiple and latent factor."""

    resolution: int
    multiple: int
    aspect_mode: str
    use_alpha: bool
    latent_factor: int
    masks: MaskOptions


# ------------------------------------------------------------------------------ opening


def open_dataset(spec: DatasetSpec):
    """The split `spec` names, checked (it exists, has rows, and its columns are there and hold
    images); image and mask columns come back undecoded, so a corrupt row costs only that row."""
    import datasets

    dataset = _load(spec)
    columns = list(dataset.features) if dataset.features else _first_row_columns(dataset, spec)
    for flag, column in (("image_column", spec.image_column), ("caption_column", spec.caption_column),
                         ("mask_column", spec.mask_column)):
        if column and column not in columns:
            hint = " (--caption_column '' trains without captions)" if flag == "caption_column" else ""
            raise DatasetError(f"--{flag} {column}: no such column in {spec.name} (its columns: "
                               f"{', '.join(columns)}){hint}")
    for flag, column in (("image_column", spec.image_column), ("mask_column", spec.mask_column)):
        feature = (dataset.features or {}).get(column) if column else None
        if column and not isinstance(feature, datasets.Image):
            raise DatasetError(f"--{flag} {column}: the column holds no images ({_describe(feature)})")
        if column:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if not (_first_row_columns(dataset, spec) if spec.streaming else len(dataset)):
        raise DatasetError(f"--dataset_name {spec.name}: split {spec.split!r} is empty")
    return dataset


def _load(spec: DatasetSpec):
    """The dataset as `datasets` loads it, or a one-line `DatasetError`."""
    import datasets

    path = Path(spec.name)
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise DatasetError(f"--dataset_split {spec.split}: {spec.name} has the splits {', '.join(loaded)}")
                loaded = loaded[spec.split]
            elif spec.split != "train":
                raise DatasetError(f"--dataset_split {spec.split}: {spec.name} is one saved split, not a set of splits")
            return loaded.to_iterable_dataset() if spec.streaming else loaded
        options = {"split": spec.split, "cache_dir": spec.cache_dir, "streaming": spec.streaming}
        if path.is_dir():
            return datasets.load_dataset(str(path), spec.config, **options)
        if path.is_file() or glob.has_magic(spec.name):
            loader = DATA_FILE_LOADERS.get(Path(spec.name).suffix.lower())
            if loader is None:
                raise DatasetError(f"--dataset_name {spec.name}: not a data file tinv reads "
                                   f"({', '.join(sorted(DATA_FILE_LOADERS))})")
            return datasets.load_dataset(loader, data_files=spec.name, **options)
        return datasets.load_dataset(spec.name, spec.config, **options)
    except DatasetError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types; each becomes one line
        raise DatasetError(_load_failure(spec, error)) from None


def _load_failure(spec: DatasetSpec, error: Exception) -> str:
    """One line for what `datasets` raised while opening `spec`."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "corresponds to no data" in text:  # datasets' words for a split without rows
        return f"--dataset_name {spec.name}: split {spec.split!r} is empty"
    if "split" in text.lower() and spec.split in text:
        return f"--dataset_split {spec.split}: {text}"
    local = Path(spec.name).exists() or glob.has_magic(spec.name)
    if not local and type(error).__name__ in ("DatasetNotFoundError", "ConnectionError", "OfflineModeIsEnabled",
                                               "FileNotFoundError", "LocalEntryNotFoundError"):
        where = spec.cache_dir or "the default cache"
        return (f"--dataset_name {spec.name}: no such folder or file, and not a hub dataset in {where} "
                f"(offline runs read the hub cache only; --cache_dir names another cache) ({type(error).__name__})")
    return f"--dataset_name {spec.name}: {text}"


def _first_row_columns(dataset, spec: DatasetSpec) -> list[str]:
    """The column names of a stream's first row ([] when it has none)."""
    first = next(iter(dataset.take(1)), None)
    return list(first) if first is not None else []


def _describe(feature) -> str:
    """A column's type as `datasets` names it (`string`, `int64`, `List`), or unknown."""
    if feature is None:
        return "type unknown"
    return getattr(feature, "dtype", None) or type(feature).__name__


# ------------------------------------------------------------------------------ rows


def open_image(value) -> Image.Image:
    """A row's undecoded image (`{"bytes", "path"}`) read as image files are (`read_image`)."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, None)
    if data is None and not path:
        raise UnreadableImage(NOT_AN_IMAGE, "the row has no image")
    return read_image(io.BytesIO(data) if data is not None else path)


def row_label(index: int, value) -> str:
    """How notices name a row: its number, and the file it came from when the dataset kept one."""
    path = value.get("path") if isinstance(value, dict) else None
    return f"row {index} ({Path(path).name})" if path else f"row {index}"


def row_image(row: dict, index: int, spec: DatasetSpec, settings: ImageSettings,
              cache_id: str) -> tuple[TrainingImage | None, list[str]]:
    """A row as the folder reader's record, and its notice lines; None (with the reason) when the
    row's image cannot be read."""
    value = row[spec.image_column]
    label = row_label(index, value)
    try:
        image = open_image(value)
    except UnreadableImage as error:
        return None, [f"{label}: {error}"]
    s = settings
    size = bucket_size(image.width, image.height, s.resolution, s.multiple, s.aspect_mode)
    latent_size = (size[0] // s.latent_factor, size[1] // s.latent_factor)
    weight, notes = _row_weight(row, spec, label, image, size, latent_size, s)
    caption = (row.get(spec.caption_column) or "") if spec.caption_column else ""
    path = Path(value["path"]) if isinstance(value, dict) and value.get("path") else Path(label)
    return TrainingImage(path, str(caption), size, training_pixels(image, size, s.aspect_mode), weight,
                         cache_id=cache_id), notes


def _row_weight(row: dict, spec: DatasetSpec, label: str, image: Image.Image, size, latent_size,
                s: ImageSettings):
    """The mask column's weight (as a mask file's), else the alpha channel's."""
    value = row.get(spec.mask_column) if spec.mask_column else None
    if value is None or not (value.get("bytes") or value.get("path")):
        return alpha_channel_weight(image, size, s.aspect_mode, latent_size, s.use_alpha, s.masks), []
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else Path(value["path"])
    if isinstance(source, io.BytesIO):
        source.name = f"{label} {spec.mask_column}"  # read_mask names the mask in its notices
    mask, note = read_mask(source, image.size)
    notes = [note] if note else []
    if mask is None:
        return None, notes
    weight, more = given_mask_weight(mask, f"{label} {spec.mask_column}", size, s.aspect_mode, latent_size, s.masks)
    return weight, notes + more


def fingerprint(dataset) -> str:
    """The identity `datasets` gives the loaded data (it changes when the data does): the latent
    cache's key for its rows."""
    return getattr(dataset, "_fingerprint", None) or ""


def load_dataset_images(spec: DatasetSpec, settings: ImageSettings) -> tuple[list[TrainingImage], list[str], list[str]]:
    """Every readable row, in dataset order, as `load_images` gives a folder's files: (records,
    one line per skipped row, notice lines)."""
    dataset = open_dataset(spec)
    key = fingerprint(dataset)
    images, skipped, notices = [], [], []
    for index, row in enumerate(dataset):
        image, notes = row_image(row, index, spec, settings, f"{key}|{index}")
        if image is None:
            skipped += notes
            continue
        images.append(image)
        notices += notes
    if not images:
        raise DatasetError(f"--dataset_name {spec.name}: no usable images ({len(skipped)} unreadable)")
    return images, skipped, notices


# ------------------------------------------------------------------------------ streaming


class StreamPlan:
    """`BatchPlan`'s counterpart for `--streaming`: micro-batch `k` is the next G rows of the
    stream (G the global batch), and the process of rank r trains on rows r*b .. r*b+b-1 of
    them (b its batch), at those positions of the global batch.

    So N processes train on exactly the samples one process with N times the batch trains on
    (the same rows at the same positions: same prompts, flips, noise), and the trained result is
    the same up to float rounding. Each process reads every row's bytes but decodes and encodes
    only its own (the `examples` split of `datasets.distributed.split_dataset_by_node`, made
    block-wise so that positions agree with one process's).

    A row whose image cannot be read is named in a notice and its place taken by the first
    readable row of the same G (every process would pick the same one); when none of the G can
    be read, the next G rows are read instead. At the stream's end the next epoch starts.

    The plan's position (`stream_state`: the epoch, the row, and `datasets`' own `state_dict()`) is
    the same on every process and goes into checkpoints, so a resumed run reads on from exactly
    where the checkpoint was written, on any number of processes that make the same global batch.
    """

    def __init__(self, dataset, spec: DatasetSpec, settings: ImageSettings, global_batch: int, batch: int, rank: int,
                 encode: Callable[[list[TrainingImage]], None]):
        self.dataset, self.spec, self.settings = dataset, spec, settings
        self.global_batch, self.batch_size, self.rank = global_batch, batch, rank
        self.encode = encode
        self.window: dict[int, TrainingImage] = {}  # this process's images of the current micro-batch, by row
        self.steps_per_epoch = 1 << 62  # unknown for a stream: loss CSVs count every step as epoch 0
        self.epoch, self.row = 0, 0
        self._rows = None
        self._resume: dict | None = None
        self._dataset_state: dict | None = None
        self._key = fingerprint(dataset)

    def describe(self) -> str:
        """The plan for the run's opening line."""
        return f"a stream of {self.spec.name} ({self.spec.split})"

    def batch(self, micro_index: int) -> tuple[int, list[int]]:
        """(epoch, rows of the global batch) for the next micro-batch; this process's rows are
        read, decoded and encoded into `window`. `micro_index` is the loop's count; the stream
        itself only moves forward (after a NaN rollback it goes on with new rows)."""
        while True:
            epoch = self.epoch
            rows = [self._next_row() for _ in range(self.global_batch)]
            members = self._read_mine(rows)
            if members is not None:
                return epoch, members

    def _read_mine(self, rows: list[tuple[int, dict]]) -> list[int] | None:
        """Decode this process's rows into `window`; the rows of the global batch after
        replacements, or None when no row of the G can be read."""
        self.window.clear()
        members = [index for index, _ in rows]
        good: dict[int, TrainingImage | None] = {}
        for position in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            image = self._decode(rows, position, good)
            if image is None:
                replacement = next((p for p in range(len(rows)) if self._decode(rows, p, good) is not None), None)
                if replacement is None:
                    return None
                members[position], image = rows[replacement][0], good[replacement]
            self.window[members[position]] = image
        self.encode(list(self.window.values()))
        return members

    def _decode(self, rows: list[tuple[int, dict]], position: int, good: dict) -> TrainingImage | None:
        if position not in good:
            index, row = rows[position]
            image, notes = row_image(row, index, self.spec, self.settings, f"{self._key}|{index}")
            good[position] = image
            for line in notes:
                print(f"{'skipped' if image is None else 'notice:'} {line}", file=sys.stderr, flush=True)
        return good[position]

    def _next_row(self) -> tuple[int, dict]:
        """(row number in the epoch, row) of the next row, starting the next epoch at the end."""
        if self._rows is None:
            self.dataset.set_epoch(self.epoch)
            if self._resume is not None:
                self.dataset.load_state_dict(self._resume)
                self._resume = None
            self._rows = iter(self.dataset)
        row = next(self._rows, None)
        if row is None:
            if self.row == 0:
                raise DatasetError(f"--dataset_name {self.spec.name}: the stream has no rows")
            self.epoch, self.row, self._rows = self.epoch + 1, 0, None
            return self._next_row()
        self._dataset_state = self.dataset.state_dict()
        self.row += 1
        return self.row - 1, row

    def stream_state(self) -> dict | None:
        """Where the stream stands, for a checkpoint."""
        return {"epoch": self.epoch, "row": self.row, "dataset": self._dataset_state or self._resume}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's `stream_state`."""
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
        self._resume, self._rows, self._dataset_state = state.get("dataset"), None, None


def image_settings(args, family) -> ImageSettings:
    """The `ImageSettings` of a run's flags and model (masks come from --mask_column, not --mask_dir)."""
    return ImageSettings(args.resolution, family.size_multiple, args.aspect_mode, args.use_alpha_as_loss_weight,
                         family.latent_factor, MaskOptions(None, args.unmasked_weight))


def open_stream(args, family, device, world: int, rank: int) -> StreamPlan:
    """The `StreamPlan` of `--streaming`, opened and checked, at the position of the checkpoint
    `--resume_from_checkpoint` names (if any); latents are encoded as its images are read."""
    import torch

    from tinv_lib.training import checkpoints as ckpt
    from tinv_lib.training.data import encode_latents

    flips = (False, True) if args.flip_p > 0 else (False,)
    spec = DatasetSpec.from_args(args)
    plan = StreamPlan(open_dataset(spec), spec, image_settings(args, family), args.train_batch_size * world,
                      args.train_batch_size, rank,
                      lambda images: encode_latents(images, family.vae, flips, device, torch.float32))
    checkpoint = (ckpt.resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
                  if args.resume_from_checkpoint else None)
    state = ckpt.read_stream_state(checkpoint) if checkpoint is not None else None
    if state is not None:
        plan.restore(state)
    elif checkpoint is not None and rank == 0:
        print(f"notice: {checkpoint.name} holds no stream position (not trained from a stream); "
              "the stream starts at its first row", file=sys.stderr)
    return plan


# ------------------------------------------------------------------------------ checks


def check_data_source(args) -> None:
    """One source of training images; flags that only apply to the other are refused; the
    dataset opens and has its columns, all before the model loads."""
    if args.dataset_name and args.train_data_dir:
        raise ArgumentError("--dataset_name and --train_data_dir both name the training images: give one")
    if not (args.dataset_name or args.train_data_dir):
        raise ArgumentError("missing required setting: --train_data_dir (a folder) or --dataset_name (a dataset)")
    only_datasets = [f"--{name}" for name in ("streaming", "mask_column", "dataset_config_name", "cache_dir")
                     if getattr(args, name)]
    if not args.dataset_name:
        if only_datasets:
            raise ArgumentError(f"{', '.join(only_datasets)}: only for --dataset_name (a folder has none)")
        return
    if args.mask_dir:
        raise ArgumentError("--mask_dir is for --train_data_dir: a dataset's masks are a column (--mask_column)")
    if args.filename_word_regex:
        raise ArgumentError("--filename_word_regex reads file names, for --train_data_dir: a dataset's captions "
                            "are a column (--caption_column)")
    if args.streaming:
        _check_streaming(args)
    open_dataset(DatasetSpec.from_args(args))


def _check_streaming(args) -> None:
    """What a stream cannot do: it has no list of images to split, cache or bucket ahead."""
    if args.validation_split:
        raise ArgumentError("--validation_split needs the whole set; with --streaming hold images out in a folder "
                            "(--validation_data_dir)")
    if args.latent_cache_dir:
        raise ArgumentError("--latent_cache_dir: with --streaming latents are encoded as the images are read")
    if args.offload_vae:
        raise ArgumentError("--offload_vae: with --streaming the VAE encodes every step's images")
    if args.aspect_mode == "buckets" and args.train_batch_size > 1:
        raise ArgumentError("--streaming batches the rows in stream order, so a batch of "
                            f"{args.train_batch_size} cannot be sorted into aspect buckets: use --aspect_mode crop "
                            "or stretch, or --train_batch_size 1")
