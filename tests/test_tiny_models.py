"""The tiny-model factory: offline, deterministic, real CLIP-format tokenizer."""

import json

import numpy as np
import pytest
import torch

from testing.tiny import ARCHITECTURES, build_tiny_pipeline
from testing.tokenizer_build import COMMON_WORDS, END_TOKEN, START_TOKEN, write_clip_tokenizer_files


def _generate(pipe, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of a red tree", num_inference_steps=2, height=64, width=64,
                generator=generator, output_type="np").images


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_tiny_pipeline_generates_reproducibly(arch):
    pipe = build_tiny_pipeline(arch, seed=0)
    first, again, other = _generate(pipe, 1), _generate(pipe, 1), _generate(pipe, 2)
    assert first.shape == (1, 64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_tiny_pipeline("sd1", seed=s) for s in (3, 3, 4))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)


def test_architectures_have_distinct_text_widths():
    widths = {arch: build_tiny_pipeline(arch).text_encoder.config.hidden_size for arch in ARCHITECTURES}
    xl = build_tiny_pipeline("sdxl")
    assert widths == {"sd1": 32, "sd2-v": 48, "sdxl": 32}
    assert xl.text_encoder_2.config.hidden_size == 48
    assert build_tiny_pipeline("sd2-v").scheduler.config.prediction_type == "v_prediction"


def test_tokenizer_files_are_clip_format(tmp_path):
    folder = write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert vocab[START_TOKEN] == len(vocab) - 2 and vocab[END_TOKEN] == len(vocab) - 1
    assert "tree</w>" in vocab and "a</w>" in vocab
    for line in merges[1:]:
        left, right = line.split(" ")
        assert left in vocab and right in vocab and left + right in vocab


def test_common_words_are_single_tokens():
    tokenizer = build_tiny_pipeline("sd1").tokenizer
    assert len(COMMON_WORDS) >= 300
    for word in ("tree", "photo", "cat", "dog", "red", "circle", "painting", "style"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    split = [w for w in COMMON_WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    ids = tokenizer("a photo of a red tree").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 8
