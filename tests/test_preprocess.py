"""`preprocess.py` end to end on real files: A1111 split/flip numbering, bad inputs, worker
processes, re-runs. Real subprocess runs of the script; tiny images (no captioning here, see
test_preprocess_captions.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from tinv_lib.common.errors import TinvError
from tinv_lib.preprocessing.folder import (
    PreprocessOptions,
    list_source_files,
    preprocess_folder,
    validate_options,
)
from tinv_lib.preprocessing.image_ops import AutosizeSettings
from tinv_lib.preprocessing.state import STATE_DIR


def run_script(*args: str) -> subprocess.CompletedProcess:
    return helpers.run_script("preprocess.py", *args)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def gradient(width: int, height: int) -> Image.Image:
    """Every row tells its own y: red = y % 256, green = y // 256 (so crops can be located)."""
    y = np.arange(height)[:, None].repeat(width, axis=1)
    pixels = np.stack([y % 256, y // 256, np.zeros_like(y)], axis=2).astype(np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------- acceptance 2


def test_split_flip_numbering_workers_and_rerun(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(512, 1536).save(src / "Tall.png")
    Image.new("RGB", (64, 64), (5, 6, 7)).save(src / "a.png")
    (src / "a.txt").write_text("a caption", encoding="utf-8")  # takes index 1, as in A1111
    args = ["--source_dir", str(src), "--split", "--split_threshold", "0.5", "--split_overlap", "0.2", "--flip"]

    first = run_script(*args, "--dest_dir", str(tmp_path / "one"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == (
        "preprocess: 2 files read, 10 images and 0 captions written, 0 skipped"
    )
    files = outputs(tmp_path / "one")
    # a.png: not oversized, default crop and resize + its mirror; Tall.png: 4 tiles, each + mirror
    assert sorted(files) == ["00000-0-a.png", "00000-1-a.png"] + [f"00002-{i}-Tall.png" for i in range(8)]
    tiles = [np.asarray(Image.open(tmp_path / "one" / f"00002-{i}-Tall.png")) for i in range(8)]
    for i, offset in enumerate([0, 341, 682, 1024]):
        tile, mirror = tiles[2 * i], tiles[2 * i + 1]
        assert tile.shape == (512, 512, 3)
        first_row = int(tile[0, 0, 0]) + 256 * int(tile[0, 0, 1])
        last_row = int(tile[-1, 0, 0]) + 256 * int(tile[-1, 0, 1])
        assert (first_row, last_row) == (offset, offset + 511)
        assert np.array_equal(mirror, tile[:, ::-1])

    second = run_script(*args, "--dest_dir", str(tmp_path / "two"), "--num_proc", "2", "--batch_size", "1")
    assert second.returncode == 0, second.stderr
    assert outputs(tmp_path / "two") == files

    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()}
    again = run_script(*args, "--dest_dir", str(tmp_path / "one"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == (
        "preprocess: 2 files read, 0 images and 0 captions written, 2 skipped (2 already done)"
    )
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()} == stamps


def test_flip_doubles_the_outputs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(64, 192).save(src / "tall.png")
    plain = preprocess_folder(PreprocessOptions(str(src), str(tmp_path / "a"), 64, 64, split=True))
    flipped = preprocess_folder(PreprocessOptions(str(src), str(tmp_path / "b"), 64, 64, split=True, flip=True))
    assert plain.images_written == 4 and flipped.images_written == 8


# ---------------------------------------------------------------------------------- acceptance 4


def make_awkward_sources(src: Path) -> None:
    src.mkdir()
    full = src / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(full)
    (src / "broken.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])  # truncated
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.md").write_text("# not an image", encoding="utf-8")
    (src / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # JPEG header, no image
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    Image.fromarray(np.full((10, 20), 257 * 128, dtype=np.uint16)).save(src / "grey16.png")
    palette = Image.new("P", (20, 10), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 10, 10))  # left half blue, right half transparent (black underneath)
    palette.save(src / "palette.png", transparency=0)
    rotated = Image.new("RGB", (10, 20), (0, 0, 0))
    rotated.paste((255, 0, 0), (0, 0, 10, 5))  # red band at the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the red band ends up on the right
    rotated.save(src / "rotated.png", exif=exif)
    rotated.save(src / "rotated.jpg", exif=exif, quality=95)
    (src / "folder.png").mkdir()  # not a file: not listed
    Image.new("RGB", (8, 8)).save(src / ".hidden.png")  # hidden: not listed


def test_awkward_inputs_are_converted_or_reported(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_awkward_sources(src)
    result = run_script("--source_dir", str(src), "--dest_dir", str(dst), "--keep_original_size")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == (
        "preprocess: 10 files read, 6 images and 0 captions written, 4 skipped (3 not an image, 1 unreadable)"
    )
    for name in ("notes.md", "empty.jpg", "garbage.jpg"):
        assert f"skipped {name}: not an image" in lines
    assert [line for line in lines if line.startswith("skipped broken.png: unreadable (")]

    names = list_source_files(src)
    index = {name: names.index(name) for name in names}

    def out(name: str) -> np.ndarray:
        return np.asarray(Image.open(dst / f"{index[name]:05}-0-{Path(name).stem}.png"))

    assert out("cmyk.jpg").shape == (10, 20, 3)
    assert np.abs(out("cmyk.jpg").astype(int) - [255, 0, 0]).max() <= 3
    assert out("grey16.png")[0, 0].tolist() == [128, 128, 128]
    palette = out("palette.png")
    assert palette[5, 2].tolist() == [0, 0, 255] and palette[5, 15].tolist() == [255, 255, 255]
    for name in ("rotated.png", "rotated.jpg"):
        pixels = out(name).astype(int)
        assert pixels.shape == (10, 20, 3)
        assert pixels[5, 18, 0] > 200 and pixels[5, 2, 0] < 50, name
    assert all(Image.open(dst / name).mode == "RGB" for name in os.listdir(dst) if name.endswith(".png"))


# ---------------------------------------------------------------------------------- acceptance 5


def test_changed_options_redo_the_work_and_drop_stale_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(src / "x.png")
    Image.new("RGB", (20, 30), (4, 5, 6)).save(src / "y.png")
    preprocess_folder(PreprocessOptions(str(src), str(dst), 16, 16, flip=True))
    assert sorted(outputs(dst)) == ["00000-0-x.png", "00000-1-x.png", "00001-0-y.png", "00001-1-y.png"]

    summary = preprocess_folder(PreprocessOptions(str(src), str(dst), 16, 16))
    assert summary.images_written == 2 and not summary.skipped
    assert sorted(outputs(dst)) == ["00000-0-x.png", "00001-0-y.png"]

    # a killed run leaves no record for the source it was on: that source alone is redone
    (dst / STATE_DIR / "00001.json").unlink()
    (dst / "00001-0-y.png").unlink()
    summary = preprocess_folder(PreprocessOptions(str(src), str(dst), 16, 16))
    assert summary.images_written == 1 and [s[0] for s in summary.skipped] == ["x.png"]
    assert sorted(outputs(dst)) == ["00000-0-x.png", "00001-0-y.png"]


def test_autosize_and_focal_crop_through_the_pipeline(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (300, 10), (9, 9, 9)).save(src / "strip.png")  # aspect 30: no size fits
    Image.new("RGB", (240, 160), (9, 9, 9)).save(src / "photo.png")
    sizes = AutosizeSettings(min_dim=64, max_dim=192, min_area=64 * 64, max_area=192 * 192)
    summary = preprocess_folder(
        PreprocessOptions(str(src), str(dst), 48, 48, autosize=True, autosize_settings=sizes, focal_crop=True)
    )
    assert summary.skipped == []  # the strip still gets its focal crop
    assert Image.open(dst / "00000-0-photo.png").size == (48, 48)  # focal crop first (A1111 order)
    assert Image.open(dst / "00000-1-photo.png").size == (192, 128)  # then the auto-sized crop
    assert Image.open(dst / "00001-0-strip.png").size == (48, 48)
    summary = preprocess_folder(PreprocessOptions(str(src), str(tmp_path / "b"), 48, 48, autosize=True,
                                                  autosize_settings=sizes))
    assert [(name, reason) for name, reason, _ in summary.skipped] == [("strip.png", "no auto-size fits")]


def test_existing_captions_carry_over_without_a_model(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20)).save(src / "a.png")
    (src / "a.txt").write_text(" a black square\n", encoding="utf-8")
    Image.new("RGB", (20, 20)).save(src / "b.png")
    summary = preprocess_folder(PreprocessOptions(str(src), str(tmp_path / "dst"), 16, 16, flip=True,
                                                  existing_caption="copy"))
    assert summary.images_written == 4 and summary.captions_written == 2
    for sub in (0, 1):
        assert (tmp_path / "dst" / f"00000-{sub}-a.txt").read_text(encoding="utf-8") == "a black square"
    assert not list((tmp_path / "dst").glob("*-b.txt"))  # no caption: no empty sidecar
    summary = preprocess_folder(PreprocessOptions(str(src), str(tmp_path / "ign"), 16, 16))
    assert summary.images_written == 2 and summary.captions_written == 0


# ------------------------------------------------------------------------------------ user errors


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    result = run_script("--source_dir", str(tmp_path / "missing"), "--dest_dir", str(tmp_path / "dst"))
    assert result.returncode == 2
    assert result.stderr == f"error: --source_dir {tmp_path / 'missing'}: no such folder\n"
    (tmp_path / "src").mkdir()
    with pytest.raises(TinvError, match="must be different"):
        validate_options(PreprocessOptions(str(tmp_path / "src"), str(tmp_path / "src" / ".")))
    with pytest.raises(TinvError, match="positive"):
        validate_options(PreprocessOptions(str(tmp_path / "src"), str(tmp_path / "dst"), width=0))
    (tmp_path / "yunet.onnx").write_bytes(b"not really a model")
    face = PreprocessOptions(str(tmp_path / "src"), str(tmp_path / "dst"), focal_crop=True,
                             face_model=str(tmp_path / "nowhere.onnx"))
    with pytest.raises(TinvError, match="no such file"):
        validate_options(face)
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(TinvError, match="needs OpenCV"):
            validate_options(PreprocessOptions(str(tmp_path / "src"), str(tmp_path / "dst"), focal_crop=True,
                                               face_model=str(tmp_path / "yunet.onnx")))
