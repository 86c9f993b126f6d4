"""`python -m tinv_lib.embeddings inspect|convert`: JSON records, conversions, exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_embeddings import FIXTURES, same_bits, sample_embedding

from tinv_lib.embeddings import load_embedding, save_embedding
from tinv_lib.embeddings.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tinv_lib.embeddings", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_inspect_as_a_real_command(tmp_path):
    """One subprocess run: A1111 .pt and PNG, an SDXL file, and a bad file (exit 2, one line)."""
    sdxl = save_embedding(sample_embedding("xl", "sdxl", vectors=2), tmp_path / "xl.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"nonsense")
    result = run_cli(
        "inspect", str(FIXTURES / "emb-2v768-legacy.pt"), str(FIXTURES / "emb-2v768-pixels-only.png"),
        str(sdxl), str(tmp_path / "bad.pt"),
    )
    assert result.returncode == 2
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0] == {
        "file": str(FIXTURES / "emb-2v768-legacy.pt"), "name": "emb-2v768-legacy", "format": "a1111-pt",
        "vectors": 2, "dim": 768, "step": 1500, "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "fixture-model", "checksum": "4d2f", "shorthash": "c974096a2474",
    }
    assert records[1]["name"] == "fixture-emb-2v" and records[1]["format"] == "png-pixels"
    assert records[2]["dim"] == {"clip_l": 768, "clip_g": 1280} and records[2]["vectors"] == {"clip_l": 2, "clip_g": 2}
    assert records[2]["format"] == "sdxl-safetensors" and records[2]["step"] == 1234
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "bad.pt" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["out.safetensors", "out.bin", "out.png", "out.pt"])
def test_convert_between_formats(tmp_path, capsys, target):
    assert main(["convert", str(FIXTURES / "emb-2v768-legacy.pt"), str(tmp_path / target)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "out" and record["checksum"] == "4d2f"
    converted = load_embedding(tmp_path / target)
    assert same_bits(converted.vectors, load_embedding(FIXTURES / "emb-2v768-legacy.pt").vectors)


def test_convert_png_with_picture_and_name(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "preview.jpg")
    source = save_embedding(sample_embedding("src"), tmp_path / "src.pt")
    assert main(["convert", str(source), str(tmp_path / "x.png"), "--name", "my-style", "--image", str(tmp_path / "preview.jpg")]) == 0
    embedding = load_embedding(tmp_path / "x.png")
    assert embedding.name == "my-style" and embedding.step == 1234
    assert Image.open(tmp_path / "x.png").size[1] == 48


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "missing.pt", "out.pt"], "file not found"),
        (["convert", "{fixture}", "out.ckpt"], "cannot write"),
        (["convert", "{fixture}", "{fixture}"], "already exists"),
        (["inspect", "{evil}"], "forbidden"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    evil = tmp_path / "evil.pt"
    torch.save({"x": print}, evil)  # pickles a reference to builtins.print
    fixture = tmp_path / "f.pt"
    fixture.write_bytes((FIXTURES / "emb-2v768-legacy.pt").read_bytes())
    args = [arg.format(fixture=fixture, evil=evil) for arg in args]
    args = [str(tmp_path / arg) if arg.startswith("out") or arg == "missing.pt" else arg for arg in args]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
