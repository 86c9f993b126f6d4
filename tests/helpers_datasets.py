"""Small training sets built in code, written as a folder and as each kind of dataset source
`--dataset_name` reads (save_to_disk, parquet, arrow files, an image folder with metadata.jsonl,
webdataset shards, a hub cache): the same images, captions and masks in the same order."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

CAPTIONS = ["red, circle, white background", "blue, square", "green circle", "yellow, square, grey", "a red square",
            "purple, circle", "orange, triangle", "cyan, square"]


def drawing(index: int) -> tuple[Image.Image, Image.Image | None]:
    """The `index`-th image (64x64, one in three 64x48 for a second bucket, every fourth with
    alpha) and its mask (every other image has one: its left half)."""
    width, height = (64, 48) if index % 3 == 2 else (64, 64)
    image = Image.new("RGBA" if index % 4 == 3 else "RGB", (width, height), "white")
    colour = ["red", "blue", "green", "yellow", "red", "purple", "orange", "cyan"][index % 8]
    box = [6 + 3 * index, 8, 50, height - 4 - index]
    (ImageDraw.Draw(image).ellipse if index % 2 == 0 else ImageDraw.Draw(image).rectangle)(box, fill=colour)
    if index % 2:
        return image, None
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, width // 2, height], fill=255)
    return image, mask


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(folder: Path, count: int, masks: bool = True) -> Path:
    """The set as a training folder: `<n>.png`, `<n>.txt` captions, `<n>-masklabel.png` masks."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image, mask = drawing(index)
        image.save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(CAPTIONS[index % len(CAPTIONS)], encoding="utf-8")
        if mask is not None and masks:
            mask.save(folder / f"{index:05d}-masklabel.png")
    return folder


def build_dataset(count: int):
    """The set as a `datasets.Dataset`: `image`, `text` and `mask` (None where there is none)."""
    import datasets

    rows = [drawing(index) for index in range(count)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "mask": datasets.Image()})
    return datasets.Dataset.from_dict({"image": [image for image, _ in rows],
                                       "text": [CAPTIONS[i % len(CAPTIONS)] for i in range(count)],
                                       "mask": [mask for _, mask in rows]}, features=features)


def write_imagefolder(folder: Path, count: int) -> Path:
    """The set as diffusers documents it: images beside a `metadata.jsonl` (`file_name`, `text`,
    and `mask_file_name` for the masks)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        image, mask = drawing(index)
        image.save(folder / f"{index:05d}.png")
        entry = {"file_name": f"{index:05d}.png", "text": CAPTIONS[index % len(CAPTIONS)]}
        if mask is not None:
            mask.save(folder / f"{index:05d}_mask.png")
        entry["mask_file_name"] = f"{index:05d}_mask.png" if mask is not None else None
        lines.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_webdataset(folder: Path, count: int, shards: int = 2) -> Path:
    """The set as webdataset `.tar` shards: `<key>.png` and `<key>.txt` (no masks: every sample of
    a webdataset must have the same members)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-count // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                members = {"png": png_bytes(drawing(index)[0]), "txt": CAPTIONS[index % len(CAPTIONS)].encode()}
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{index:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder
