"""`preprocess.py --output_format dataset`: the finished destination as a `datasets` dataset.

The trainers read it with `--dataset_name <dest_dir>/dataset` and train exactly as on the folder
with `--train_data_dir <dest_dir>` (docs/preprocess.md, "Output as a dataset"): one row per
training image in the folder's order, the image's PNG bytes in `image` (the dataset stands on its
own, it can be copied or uploaded without the folder) and in `text` the caption training from
the folder would read (the `.txt` sidecar, or the words of the file name). The folder's files
stay: they are what lets a re-run of preprocessing skip finished sources.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from tinv_lib.common.errors import TinvError
from tinv_lib.common.images import IMAGE_SUFFIXES

OUTPUT_FORMATS = ("folder", "dataset")
DATASET_FOLDER = "dataset"


def training_files(dest_dir: Path) -> list[Path]:
    """The images a trainer reads from `dest_dir`, in its order (sorted, hidden files and masks out)."""
    from tinv_lib.training.data import is_mask_file

    return sorted(path for path in dest_dir.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES
                  and not path.name.startswith(".") and not is_mask_file(path))


def _rows(files: list[Path]) -> Iterator[dict]:
    from tinv_lib.training.data import caption_for

    for path in files:
        yield {"image": {"bytes": path.read_bytes(), "path": path.name}, "text": caption_for(path),
               "file_name": path.name}


def write_dataset(dest_dir: Path) -> Path:
    """Save `dest_dir`'s training images and captions with `save_to_disk` to `dest_dir/dataset`
    (replacing an older one); the path written. Rows are written one at a time, so memory holds
    one image whatever the size of the set."""
    from datasets import Dataset, Features, Image, Value

    files = training_files(dest_dir)
    if not files:
        raise TinvError(f"--output_format dataset: no training images in {dest_dir} to write")
    target, scratch = dest_dir / DATASET_FOLDER, dest_dir / f".{DATASET_FOLDER}-build"
    shutil.rmtree(scratch, ignore_errors=True)
    features = Features({"image": Image(), "text": Value("string"), "file_name": Value("string")})
    dataset = Dataset.from_generator(_rows, gen_kwargs={"files": files}, features=features,
                                     cache_dir=str(scratch / "cache"))
    dataset.save_to_disk(str(scratch / "saved"))
    shutil.rmtree(target, ignore_errors=True)
    (scratch / "saved").rename(target)
    del dataset
    shutil.rmtree(scratch, ignore_errors=True)
    return target
