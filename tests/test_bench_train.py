"""benchmarks/bench_train.py runs end to end on its micro preset: a smoke test of the script and
of the byte counts it prints, not a timing (the timings are in docs/benchmarks.md)."""

import json

import pytest

from benchmarks.bench_train import Options, main, parse_variant

MICRO_WIDTH = 32  # the micro preset's text width
VECTORS = 4  # the script's default --num_vectors


def test_micro_preset_prints_speeds_ratios_and_bytes(tmp_path, capsys):
    results_file = tmp_path / "results.json"
    argv = ["--preset", "micro", "--steps", "2", "--warmup", "1", "--repeats", "1", "--inline", "--threads", "1",
            "--no_memory", "--workdir", str(tmp_path), "--json", str(results_file)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for field in ("machine:", "command: python benchmarks/bench_train.py --preset micro", "steps/s median",
                  "x floor, median", "optimizer state B", "gradients B", "TI step / its floor",
                  "HN step / its floor", "a full vocabulary matrix", "208 prompts"):
        assert field.lower() in printed.lower(), field

    results = {(line["variant"], line["kind"]): line for line in json.loads(results_file.read_text())["results"]}
    assert set(results) == {("default", kind) for kind in ("floor-ti", "ti", "floor-hn", "hn")}
    ti, floor_ti = results["default", "ti"], results["default", "floor-ti"]
    # AdamW holds exp_avg and exp_avg_sq: num_vectors x width x 4 bytes x 2, not the vocabulary.
    assert ti["optimizer_bytes"] == floor_ti["optimizer_bytes"] == VECTORS * MICRO_WIDTH * 4 * 2
    assert ti["grad_bytes"] == floor_ti["grad_bytes"] == VECTORS * MICRO_WIDTH * 4
    assert ti["frozen_grad_bytes"] == floor_ti["frozen_grad_bytes"] == 0
    hn, floor_hn = results["default", "hn"], results["default", "floor-hn"]
    assert hn["trainable_params"] == floor_hn["trainable_params"] > 0
    assert hn["optimizer_bytes"] == 2 * hn["grad_bytes"] == 2 * 4 * hn["trainable_params"]
    assert hn["frozen_grad_bytes"] == floor_hn["frozen_grad_bytes"] == 0
    for line in results.values():
        assert line["steps_per_s_median"] > 0
    assert ti["ratio_median"] > 0 and hn["ratio_median"] > 0 and hn["prompt_cache"]["prompts"] == 208


def test_variant_strings():
    base = Options()
    assert parse_variant("default", base) == base
    both = parse_variant("+gc+8bit", base)
    assert both.gradient_checkpointing and both.use_8bit_adam and both.sdpa
    assert parse_variant("-sdpa", base).label(base) == "-sdpa"
    assert parse_variant("bf16", base).mixed_precision == "bf16"
    with pytest.raises(SystemExit):
        parse_variant("+warp_drive", base)
