"""Embedding diagnostics: the numbers, the two warnings, the training outputs and the CLI."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers_embeddings import tiny_pipeline

from tinv_lib.common.errors import TinvError
from tinv_lib.embeddings import create_embedding, save_embedding
from tinv_lib.embeddings.__main__ import main as embeddings_cli
from tinv_lib.embeddings.diagnostics import (
    BARELY_MOVED_COSINE,
    OVERRIDE_NORM_RATIO,
    VectorDiagnosis,
    diagnose,
    diagnose_embedding,
    load_vocabularies,
    warnings_for,
)
from tinv_lib.models.family import family_of


class LetterTokenizer:
    """Token i is spelled by the i-th letter."""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return ["abcde"[i] for i in ids]


def _vocabulary() -> torch.Tensor:
    """Five orthogonal rows of norms 1..5 (median 3)."""
    return torch.diag(torch.arange(1.0, 6.0))


def _record(cosine: float | None, ratio: float, index: int = 0) -> VectorDiagnosis:
    return VectorDiagnosis("emb_params", index, ratio * 0.4, 50.0, ratio, cosine, (("cat</w>", 0.5),))


def test_norm_percentile_ratio_and_nearest_on_a_hand_made_vocabulary():
    weights = _vocabulary()
    vectors = torch.stack([weights[3], 0.5 * weights[0], 10 * weights[1]])
    init = torch.stack([weights[3], weights[2], -weights[1]])
    first, short, long = diagnose(vectors, weights, LetterTokenizer(), init)
    assert first.nearest[0] == ("d", pytest.approx(1.0)) and first.nearest[1][1] == pytest.approx(0.0)
    assert first.norm == pytest.approx(4.0) and first.norm_percentile == pytest.approx(80.0)
    assert first.norm_ratio == pytest.approx(4 / 3) and first.cosine_to_init == pytest.approx(1.0)
    assert short.norm_percentile == 0.0 and short.nearest[0][0] == "a" and short.cosine_to_init == pytest.approx(0.0)
    assert long.norm_percentile == 100.0 and long.norm_ratio == pytest.approx(20 / 3)
    assert long.cosine_to_init == pytest.approx(-1.0)
    assert diagnose(vectors, weights, LetterTokenizer())[0].cosine_to_init is None  # no init known


def test_warnings_fire_on_constructed_cases_only():
    ordinary = [_record(0.4, 1.2, 0), _record(0.7, 2.0, 1)]
    assert warnings_for("good", ordinary) == []
    barely = [_record(BARELY_MOVED_COSINE + 0.01, 1.0, 0), _record(0.999, 1.1, 1)]
    [line] = warnings_for("stuck", barely)
    assert "stuck barely moved" in line and "0.99" in line and "higher learning rate" in line
    assert warnings_for("stuck", [_record(None, 1.0)]) == []  # a file without init: not judged
    assert warnings_for("half", [_record(0.999, 1.0), _record(0.5, 1.0, 1)]) == []  # one vector moved
    loud = [_record(0.3, OVERRIDE_NORM_RATIO + 2, 0), _record(0.3, 1.0, 1)]
    [line] = warnings_for("loud", loud)
    assert "loud may override prompts" in line and "1 of 2" in line and f"{OVERRIDE_NORM_RATIO + 2:.1f}x" in line
    assert "lower learning rate" in line and "fewer vectors" in line


def test_warnings_from_real_numbers():
    weights = _vocabulary()
    untouched = diagnose(weights[:2].clone(), weights, LetterTokenizer(), weights[:2])
    assert "barely moved" in " ".join(warnings_for("x", untouched))
    huge = diagnose(weights[4:] * (OVERRIDE_NORM_RATIO + 1), weights, LetterTokenizer())
    assert "override prompts" in " ".join(warnings_for("x", huge))


def test_nearest_tokens_on_a_tiny_model(tiny_sd1_path):
    vocabularies = load_vocabularies(tiny_sd1_path)
    vocabulary = vocabularies["emb_params"]
    ids = vocabulary.tokenizer("cat circle", add_special_tokens=False)["input_ids"]
    records = diagnose_embedding(vocabulary.weights[ids], vocabularies)
    assert [r.nearest[0][0] for r in records] == ["cat</w>", "circle</w>"]
    assert all(r.nearest[0][1] == pytest.approx(1.0, abs=1e-5) and len(r.nearest) == 3 for r in records)
    expected = [(vocabulary.norms <= vocabulary.norms[i]).double().mean().item() * 100 for i in ids]
    assert [r.norm_percentile for r in records] == pytest.approx(expected)


def test_sdxl_diagnoses_both_encoders_against_their_own_vocabulary(tiny_sdxl_path):
    vocabularies = load_vocabularies(tiny_sdxl_path)
    assert [v.width for v in vocabularies.values()] == [32, 48]
    pipe = tiny_pipeline("sdxl")  # the same model (seed 0) as tiny_sdxl_path
    embedding = create_embedding("xl", family_of(pipe), "dog", 2)
    init = {key: value.clone() for key, value in embedding.vectors.items()}
    records = diagnose_embedding(embedding.vectors, vocabularies, init)
    assert [(r.key, r.index) for r in records] == [("clip_l", 0), ("clip_l", 1), ("clip_g", 0), ("clip_g", 1)]
    assert all(r.nearest[0][0] == "dog</w>" and r.cosine_to_init == pytest.approx(1.0) for r in records)
    with pytest.raises(TinvError, match="width 32 do not fit"):
        diagnose_embedding(embedding.vectors["clip_l"], vocabularies)


def test_training_reports_diagnostics_at_every_save(tiny_sd1_path, training_images, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinv_lib.training.textual_inversion import main

    code = main(["--pretrained_model_name_or_path", str(tiny_sd1_path), "--train_data_dir", str(training_images),
                 "--output_dir", str(tmp_path), "--placeholder_token", "my-thing", "--initializer_token", "cat",
                 "--num_vectors", "2", "--resolution", "64", "--max_train_steps", "4", "--save_steps", "2",
                 "--learning_rate", "0.05", "--checkpointing_steps", "0", "--validation_steps", "0"])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "embedding_diagnostics.csv").open()))
    assert [(row["step"], row["key"], row["vector"]) for row in rows] == [
        ("2", "emb_params", "0"), ("2", "emb_params", "1"), ("4", "emb_params", "0"), ("4", "emb_params", "1")]
    assert all(-1 <= float(row["cosine_to_init"]) < 1 and 0 <= float(row["norm_percentile"]) <= 100 for row in rows)
    assert rows[0]["nearest_tokens"].count(";") == 2
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    for quantity in ("norm", "norm_percentile", "cosine_to_init"):
        assert [e.step for e in events.Scalars(f"embedding/emb_params/1/{quantity}")] == [2, 4]
    assert events.Scalars("embedding/emb_params/0/norm")[-1].value == pytest.approx(float(rows[2]["norm"]), rel=1e-4)
    out = capsys.readouterr().out
    assert "my-thing emb_params[0]: norm" in out and "my-thing emb_params[1]: norm" in out


def test_cli_diagnoses_files_and_needs_a_model(tiny_sd1_path, tiny_sdxl_path, tmp_path, capsys):
    sd1 = load_vocabularies(tiny_sd1_path)["emb_params"]
    ids = sd1.tokenizer("cat", add_special_tokens=False)["input_ids"]
    from tinv_lib.embeddings import Embedding

    save_embedding(Embedding("loud", sd1.weights[ids] * 50), tmp_path / "loud.safetensors")
    save_embedding(Embedding("wide", torch.ones(1, 768)), tmp_path / "wide.pt")
    code = embeddings_cli(["inspect", "--diagnose", str(tmp_path / "loud.safetensors"), str(tmp_path / "wide.pt"),
                           "--model", str(tiny_sd1_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "loud emb_params[0]: norm" in out and "nearest cat</w> 1.000" in out and "cosine to init" not in out
    assert "loud may override prompts" in err and "wide.pt: vectors of width 768 do not fit" in err
    assert "Traceback" not in err
    assert embeddings_cli(["inspect", "--diagnose", str(tmp_path / "loud.safetensors"), "--model", "nowhere"]) == 2
    assert capsys.readouterr().err.strip() == "error: nowhere: no such model folder or file"
    with pytest.raises(SystemExit) as exit_info:
        embeddings_cli(["inspect", "--diagnose", str(tmp_path / "loud.safetensors")])
    assert exit_info.value.code == 2 and "--diagnose needs --model" in capsys.readouterr().err


def test_cli_diagnoses_an_sdxl_file(tiny_sdxl_path, tmp_path, capsys):
    vocabularies = load_vocabularies(tiny_sdxl_path)
    vectors = {key: vocabulary.weights[:2].clone() for key, vocabulary in vocabularies.items()}
    from tinv_lib.embeddings import Embedding

    save_embedding(Embedding("xl", vectors), tmp_path / "xl.safetensors")
    assert embeddings_cli(["inspect", "--diagnose", str(tmp_path / "xl.safetensors"), "--model", str(tiny_sdxl_path)]) == 0
    out = capsys.readouterr().out
    assert "xl clip_l[1]: norm" in out and "xl clip_g[1]: norm" in out
