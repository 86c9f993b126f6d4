"""The `parameters` infotext: A1111's field order and quoting, our parser reading A1111's texts,
and parse(format(settings)) == settings for awkward prompts, names and numbers."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from tinv_lib.generation.infotext import (
    GenerationParameters,
    InfotextError,
    format_infotext,
    parameters_from_infotext,
    parse_infotext,
    png_info,
    quote,
    read_infotext,
    ti_hash_entries,
)


def test_a1111_example_is_written_exactly():
    """The example line of docs/formats.md, "Infotext", field for field and quote for quote."""
    params = GenerationParameters(
        prompt="a castle on a hill, (golden hour:1.2)", negative_prompt="EasyNegative, blurry", steps=20,
        sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=7.0, seed=123456, width=512, height=512,
        model_hash="6ce0161689", model="v1-5-pruned-emaonly", rng="GPU", ti_hashes="EasyNegative: c74b4e810b03",
        version="v1.10.1",
    )
    assert format_infotext(params) == (
        "a castle on a hill, (golden hour:1.2)\n"
        "Negative prompt: EasyNegative, blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123456, Size: 512x512, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1'
    )


def test_our_fields_and_their_order():
    params = GenerationParameters(
        prompt="(cat)", steps=2, sampler="Euler a", cfg_scale=7.5, seed=9, width=64, height=96, model_hash="0123456789",
        model="my, model", ti_hashes="a: 111111111111, b: 222222222222", emphasis="No norm", batch_size=2, batch_pos=1,
        version="tinv 0.1.0",
    )
    assert format_infotext(params) == (
        "(cat)\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 9, Size: 64x96, "
        'Model hash: 0123456789, Model: "my, model", RNG: CPU, TI hashes: "a: 111111111111, b: 222222222222", '
        "Emphasis: No norm, Batch size: 2, Batch pos: 1, Version: tinv 0.1.0"
    )
    # Emphasis only when a prompt has brackets; batch fields only for batches; no negative line when empty
    plain = GenerationParameters(prompt="cat", emphasis="No norm", seed=1)
    assert "Emphasis" not in format_infotext(plain) and "Batch" not in format_infotext(plain)
    assert "Negative prompt" not in format_infotext(plain)


def test_quoting_rule():
    assert quote("plain text") == "plain text"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote("two\nlines") == '"two\\nlines"'
    assert quote("caf\u00e9, \u732b") == '"caf\u00e9, \u732b"'  # ensure_ascii=False, as A1111
    assert quote('"starts quoted') == '"\\"starts quoted"'  # ours: keeps such a value readable


def test_reads_a1111_infotexts():
    old = "a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 4077357776, Size: 512x512, Model hash: 45dee52b"
    params, ignored = parameters_from_infotext(old)
    assert params == GenerationParameters(
        prompt="a dog", steps=20, sampler="Euler a", schedule_type="Automatic", cfg_scale=7.0, seed=4077357776,
        width=512, height=512, model_hash="45dee52b", rng="GPU",
    )
    assert ignored == {}
    modern = (
        "masterpiece, (a fox:1.3) in a forest\n  under the moon  \n"
        "Negative prompt: lowres, bad hands\nworst quality\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 42, Size: 768x512, "
        'Model hash: aaaaaaaaaa, Model: sd15, Clip skip: 2, TI hashes: "bad-hands-5: 0123456789ab", '
        'Hires upscale: 2, Lora hashes: "x: 99", Version: v1.10.1'
    )
    params, ignored = parameters_from_infotext(modern)
    assert params.prompt == "masterpiece, (a fox:1.3) in a forest\nunder the moon"
    assert params.negative_prompt == "lowres, bad hands\nworst quality"
    assert (params.steps, params.cfg_scale, params.width, params.height, params.schedule_type) == (30, 5.5, 768, 512, "Karras")
    assert ti_hash_entries(params.ti_hashes) == {"bad-hands-5": "0123456789ab"}
    assert ignored == {"Clip skip": "2", "Hires upscale": "2", "Lora hashes": "x: 99"}


def test_a_last_line_with_fewer_than_three_fields_is_prompt():
    fields = parse_infotext("a cat\nsteps: many, ok")
    assert fields == {"Prompt": "a cat\nsteps: many, ok", "Negative prompt": ""}


def test_legacy_hypernet_fields_become_a_prompt_tag():
    text = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Hypernet: anime, Hypernet strength: 0.5"
    assert parameters_from_infotext(text)[0].prompt == "a cat<hypernet:anime:0.5>"


def test_bad_values_are_one_line_errors():
    with pytest.raises(InfotextError, match="Steps: 'many' is not a whole number"):
        parameters_from_infotext("x\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1")
    with pytest.raises(InfotextError, match="Size: '512' is not WIDTHxHEIGHT"):
        parameters_from_infotext("x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512")


FRAGMENTS = ["a cat", "(red:1.2)", "[blue]", "x, y", "k: v", "caf\u00e9", "\u732b", 'say "hi"', "back\\slash",
             "<hypernet:ink:0.8>", "BREAK", "EasyNegative", "50%", "a;b", "tab\tin", "emoji \U0001f600"]


def _text(rng: random.Random, lines: int) -> str:
    made = []
    for _ in range(lines):
        made.append(" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 4))).strip())
    return "\n".join(made)


def test_parse_of_format_is_identity_for_many_settings():
    rng = random.Random(0)
    for _ in range(300):
        batch = rng.choice([1, 1, 2, 4])
        names = rng.sample(["neg", "my-style", "x y", "\u732b"], rng.randint(0, 3))
        params = GenerationParameters(
            prompt=_text(rng, rng.randint(0, 3)),
            negative_prompt=_text(rng, rng.randint(0, 2)),
            steps=rng.randint(1, 150),
            sampler=rng.choice(["Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM"]),
            schedule_type=rng.choice(["Automatic", "Karras", "SGM Uniform"]),
            cfg_scale=rng.choice([7.0, 1.0, 7.5, 12.345678, 0.1 + 0.2]),
            seed=rng.randrange(4294967294),
            width=rng.choice([None, 64, 512, 1024]),
            model_hash=rng.choice([None, "0123456789"]),
            model=rng.choice([None, "v1-5", "my, model", "a: b", 'q"uote']),
            rng=rng.choice(["CPU", "GPU", "NV"]),
            ti_hashes=", ".join(f"{name}: {index:012x}" for index, name in enumerate(names)) or None,
            emphasis=rng.choice(["Original", "No norm"]),
            batch_size=batch,
            batch_pos=rng.randrange(batch),
            version=rng.choice([None, "tinv 0.1.0", "v1.10.1"]),
        )
        params.height = params.width
        if params.emphasis != "Original" and not any(c in params.prompt + params.negative_prompt for c in "(["):
            params.emphasis = "Original"  # A1111 writes Emphasis only for prompts with brackets
        text = format_infotext(params)
        parsed, ignored = parameters_from_infotext(text)
        assert (parsed, ignored) == (params, {}), text
        assert format_infotext(parsed) == text


def test_png_round_trip_latin1_and_unicode(tmp_path):
    for name, text in [("latin", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1"),
                       ("unicode", "\u732b\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1")]:
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(text))
        assert read_infotext(path) == text
    (tmp_path / "params.txt").write_text("a dog\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1", encoding="utf-8")
    assert read_infotext(tmp_path / "params.txt").startswith("a dog")
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(InfotextError, match="has no A1111 'parameters' text"):
        read_infotext(tmp_path / "bare.png")
    with pytest.raises(InfotextError, match="no such file"):
        read_infotext(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    with pytest.raises(InfotextError, match="not a readable image"):
        read_infotext(tmp_path / "junk.png")
