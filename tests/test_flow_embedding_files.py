"""FLUX.1 and SD3 embedding files: tinv writes `clip_l` (+ `clip_g`) and the T5 vectors under both
`t5xxl` (ComfyUI) and `t5` (OneTrainer, diffusers), and reads every layout those programs write
(docs/formats.md, "FLUX.1 and SD3 files")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinv_lib.common.errors import FileFormatError
from tinv_lib.embeddings import Embedding, load_embedding, save_embedding
from tinv_lib.embeddings.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"flux": {"clip_l": 32, "t5": 40}, "sd3": {"clip_l": 32, "clip_g": 48, "t5": 96}}


def vectors_for(family: str, rows: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(rows, width, generator=generator) for key, width in WIDTHS[family].items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_written_files_carry_t5_under_both_keys_and_read_back(family, suffix, tmp_path):
    vectors = vectors_for(family)
    path = save_embedding(Embedding("concept", vectors, step=12), tmp_path / f"concept{suffix}")
    raw = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    expected_keys = ["clip_l", "clip_g", "t5xxl", "t5"] if family == "sd3" else ["clip_l", "t5xxl", "t5"]
    assert set(raw) == set(expected_keys)  # safetensors stores keys sorted
    assert torch.equal(raw["t5xxl"], vectors["t5"]) and torch.equal(raw["t5"], vectors["t5"])
    back = load_embedding(path)
    assert back.format == f"{family}-{suffix[1:]}" and equal(back.vectors, vectors)
    assert back.dim == WIDTHS[family] and back.vector_count == 2
    if suffix == ".safetensors":
        assert back.step == 12


def _layouts() -> list[tuple[str, str, dict[str, str]]]:
    """(who writes it, family, {file key: our key}) for every row of the issue's table."""
    return [
        ("OneTrainer SD3", "sd3", {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5", "clip_l_out": "clip_l",
                                   "clip_g_out": "clip_g", "t5_out": "t5"}),
        ("OneTrainer FLUX.1", "flux", {"clip_l": "clip_l", "t5": "t5", "clip_l_out": "clip_l", "t5_out": "t5"}),
        ("diffusers advanced Flux script", "flux", {"clip_l": "clip_l", "t5": "t5"}),
        ("ComfyUI SD3", "sd3", {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5"}),
        ("ComfyUI FLUX.1", "flux", {"clip_l": "clip_l", "t5xxl": "t5"}),
    ]


@pytest.mark.parametrize("writer, family, keys", _layouts(), ids=[row[0] for row in _layouts()])
def test_every_layout_of_the_table_reads(writer, family, keys, tmp_path):
    vectors = vectors_for(family)
    outputs = vectors_for(family, seed=1)  # output embeddings differ from the input vectors
    tensors = {key: (outputs if key.endswith("_out") else vectors)[ours] for key, ours in keys.items()}
    save_file({key: value.contiguous() for key, value in tensors.items()}, tmp_path / "theirs.safetensors")
    torch.save(tensors, tmp_path / "theirs.pt")
    for path in (tmp_path / "theirs.safetensors", tmp_path / "theirs.pt"):
        embedding = load_embedding(path)
        assert embedding.format.startswith(family) and equal(embedding.vectors, vectors), (writer, path)


def test_a_file_of_output_embeddings_only_is_refused_in_one_line(tmp_path):
    save_file({"clip_l_out": torch.zeros(2, 32), "t5_out": torch.zeros(2, 40)}, tmp_path / "out.safetensors")
    with pytest.raises(FileFormatError) as caught:
        load_embedding(tmp_path / "out.safetensors")
    message = str(caught.value)
    assert "only output embeddings (clip_l_out, t5_out" in message and "\n" not in message
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "tinv_lib.embeddings", "inspect", str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "only output embeddings" in result.stderr


def test_t5_and_t5xxl_that_disagree_are_refused(tmp_path):
    save_file({"clip_l": torch.zeros(1, 32), "t5xxl": torch.zeros(1, 40), "t5": torch.ones(1, 40)},
              tmp_path / "both.safetensors")
    with pytest.raises(FileFormatError, match="`t5xxl` and `t5` hold different vectors"):
        load_embedding(tmp_path / "both.safetensors")


def test_inspect_and_convert_keep_every_encoder(tmp_path, capsys):
    vectors = vectors_for("sd3", rows=3)
    source = save_embedding(Embedding("three", vectors, step=5), tmp_path / "three.safetensors")
    assert main(["inspect", str(source)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "sd3-safetensors" and record["dim"] == WIDTHS["sd3"]
    assert record["vectors"] == {"clip_l": 3, "clip_g": 3, "t5": 3}
    assert main(["convert", str(source), str(tmp_path / "three.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["checksum"] == record["checksum"]
    assert equal(load_embedding(tmp_path / "three.pt").vectors, vectors)


def test_diffusers_flux_pipeline_loads_the_file_one_encoder_at_a_time(tiny_flux_path, tmp_path):
    """diffusers' documented way for FLUX.1: `load_textual_inversion` once per encoder, the CLIP
    vectors into `text_encoder`, the T5 vectors into `text_encoder_2`."""
    from diffusers import FluxPipeline

    vectors = vectors_for("flux")
    path = save_embedding(Embedding("concept", vectors), tmp_path / "concept.safetensors")
    state = load_file(path)
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.load_textual_inversion(state["clip_l"], token=["<c0>", "<c1>"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["t5"], token=["<c0>", "<c1>"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("t5", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer.convert_tokens_to_ids(["<c0>", "<c1>"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors[key])
        assert set(ids) <= set(tokenizer("a <c0> <c1> toy").input_ids)  # each an added token


def test_diagnostics_compare_each_encoders_vectors_with_its_own_vocabulary(tiny_flux_path, tmp_path, capsys):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    red_l = pipe.tokenizer("red", add_special_tokens=False).input_ids[0]
    red_t5 = pipe.tokenizer_2("red", add_special_tokens=False).input_ids[0]
    vectors = {"clip_l": pipe.text_encoder.get_input_embeddings().weight[[red_l]].detach(),
               "t5": pipe.text_encoder_2.get_input_embeddings().weight[[red_t5]].detach()}
    path = save_embedding(Embedding("red", vectors), tmp_path / "red.safetensors")
    assert main(["inspect", "--diagnose", str(path), "--model", str(tiny_flux_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "nearest red</w> 1.000" in lines[1] and lines[1].strip().startswith("red clip_l[0]")
    assert "nearest \u2581red 1.000" in lines[2] and lines[2].strip().startswith("red t5[0]")
