"""The object scan (`benchmarks/object_scan.py`): words first, training only for the pairs the
model draws from words, the trained file judged and listed worst first (the numbers:
docs/training.md, "Object embeddings that end below their own words")."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import object_scan
from tinv_lib.embeddings.formats import load_embedding


def test_scan_trains_only_what_the_words_draw(tmp_path, capsys):
    out = tmp_path / "scan.json"
    assert object_scan.main(["--pairs", "square:pink", "triangle:red", "--num_seeds", "2", "--train_flags",
                             "--max_train_steps 2", "--workers", "1", "--work_dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    reports = {r["concept"]: r for r in json.loads(out.read_text())["pairs"]}
    drawn, missed = reports["scan-pink-square"], reports["scan-red-triangle"]
    assert drawn["words"]["match"] >= 0.75 > missed["words"]["match"]  # 2 seeds: 1 of 2 triangles
    assert "trained" not in missed and not (tmp_path / "work" / "scan-red-triangle").exists()
    assert drawn["trained"]["seen"]["colour"] and drawn["norm_ratio"] > 0
    trained = load_embedding(tmp_path / "work" / "scan-pink-square" / "run" / "scan-pink-square.pt")
    assert trained.step == 2 and drawn["embedding"].endswith("scan-pink-square.pt")
    printed = capsys.readouterr().out
    assert "| pink square |" in printed and "1 of 2 pairs drawn from words" in printed


def test_pairs_must_be_shapes_and_colours_of_the_world():
    assert object_scan.parse_pair("ring:blue") == ("ring", "blue")
    with pytest.raises(argparse.ArgumentTypeError, match="SHAPE:COLOUR"):
        object_scan.parse_pair("blue:ring")
