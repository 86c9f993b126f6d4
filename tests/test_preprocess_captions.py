"""Captioning through `preprocess.py --caption_model` with a real (tiny, random) BLIP model.

The model is built from a config and saved to a folder, with a BERT word-piece tokenizer made
from a small vocab.txt, so nothing is downloaded. Its words are gibberish; the plumbing (local
loading, the image-text-to-text pipeline, worker processes, sidecars, names) is real.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from tinv_lib.common.errors import TinvError
from tinv_lib.preprocessing.captioning import CaptionSettings, get_captioner
from tinv_lib.preprocessing.folder import PreprocessOptions, preprocess_folder

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["red", "cat", "sky", "tree", "blue", "dog", "house", "sun", "car", "hat", "boat", "leaf"]


def build_tiny_blip(folder: Path) -> Path:
    """Save a random BLIP captioner (32-px images, 16-wide layers) with its processor."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder)  # reads the vocab.txt just written
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=16))
    with torch.no_grad():  # a random model mostly emits special tokens, which decode to "": favour words
        special_ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL + ["[DEC]"]]
        model.text_decoder.cls.predictions.decoder.bias[special_ids] = -50.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


def make_sources(folder: Path) -> None:
    """Three small images with different content (one with an existing caption) and a non-image."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.new("RGB", (40, 120), (30, 160, 220)).save(folder / "tall.png")
    Image.new("RGB", (50, 50), (250, 200, 10)).save(folder / "square.jpg")
    (folder / "square.txt").write_text("a yellow square", encoding="utf-8")
    (folder / "readme.md").write_text("not an image", encoding="utf-8")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return helpers.run_script("preprocess.py", *args, timeout=300)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_tiny_blip_captions_images_in_memory(blip: Path) -> None:
    captioner = get_captioner(CaptionSettings(model=str(blip), max_tokens=5, device="cpu"))
    captions = captioner([Image.new("RGB", (20, 30), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))])
    assert len(captions) == 2
    for caption in captions:
        words = caption.split()
        assert 1 <= len(words) <= 5 and set(words) <= set(WORDS), caption


def test_every_output_gets_a_caption_and_workers_agree(blip: Path, tmp_path: Path) -> None:
    make_sources(tmp_path / "src")
    common = ["--source_dir", str(tmp_path / "src"), "--caption_model", str(blip), "--caption_max_tokens", "6",
              "--caption_device", "cpu", "--flip", "--split", "--existing_caption", "prepend", "--width", "32",
              "--height", "32"]
    one = run_script(*common, "--dest_dir", str(tmp_path / "one"), "--num_proc", "1")
    assert one.returncode == 0, one.stderr
    two = run_script(*common, "--dest_dir", str(tmp_path / "two"), "--num_proc", "2", "--batch_size", "1")
    assert two.returncode == 0, two.stderr

    files = tree(tmp_path / "one")
    images = sorted(name for name in files if name.endswith(".png"))
    # noise: 1 output + flip; tall (40x120 vs 32x32: ratio 1/3) splits into 4 tiles + flips; square: 1 + flip
    assert len(images) == 2 + 8 + 2
    for name in images:
        caption = files[name[:-4] + ".txt"].decode("utf-8")
        assert caption.strip() and caption == caption.strip()
    # prepend: the source's caption, then the model's words
    square = [name for name in images if name.endswith("-square.png")]
    for name in square:
        caption = files[name[:-4] + ".txt"].decode("utf-8")
        assert caption.startswith("a yellow square ") and set(caption.split()[3:]) <= set(WORDS)
    assert "skipped readme.md: not an image" in one.stdout
    assert "12 images and 12 captions written" in one.stdout

    assert tree(tmp_path / "two") == files  # num_proc 2 (one source per batch): identical bytes

    again = run_script(*common, "--dest_dir", str(tmp_path / "one"), "--num_proc", "2")
    assert again.returncode == 0, again.stderr
    assert "0 images and 0 captions written" in again.stdout and "3 already done" in again.stdout
    assert tree(tmp_path / "one") == files


def test_captions_in_file_names_follow_a1111(blip: Path, tmp_path: Path) -> None:
    make_sources(tmp_path / "src")
    options = PreprocessOptions(
        source_dir=str(tmp_path / "src"), dest_dir=str(tmp_path / "dst"), width=32, height=32,
        caption=CaptionSettings(model=str(blip), max_tokens=4, device="cpu"), caption_output="filename",
        existing_caption="copy",
    )
    summary = preprocess_folder(options)
    assert summary.images_written == 3 and summary.captions_written == 0
    names = sorted(p.name for p in (tmp_path / "dst").iterdir() if p.is_file())
    assert all(name.endswith(".png") for name in names)  # no sidecars in this mode
    # listing order: noise.png 0, readme.md 1, square.jpg 2, square.txt 3, tall.png 4
    assert names[0].startswith("00000-0-") and names[2].startswith("00004-0-")
    assert names[1] == "00002-0-a yellow square.png"  # `copy` keeps the existing caption
    for name in (names[0], names[2]):
        # what [filewords] reads back (docs/formats.md, "Captions and prompt templates")
        caption = re.sub(r"^[-\d]+\s*", "", name[:-4])
        assert caption and set(caption.split()) <= set(WORDS)


def test_caption_model_must_be_a_local_model_folder(tmp_path: Path) -> None:
    make_sources(tmp_path / "src")
    result = run_script("--source_dir", str(tmp_path / "src"), "--dest_dir", str(tmp_path / "dst"),
                        "--caption_model", "Salesforce/blip-image-captioning-base")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --caption_model Salesforce/blip-image-captioning-base: not a folder")
    assert "Traceback" not in result.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TinvError, match="cannot load it as an image-to-text model"):
        get_captioner(CaptionSettings(model=str(tmp_path / "broken"), device="cpu"))
