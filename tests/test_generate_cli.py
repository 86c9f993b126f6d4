"""generate.py end to end on the tiny models: same arguments give the same pixels, the PNG's
infotext parses back into the settings, `--from_infotext` remakes an image bit for bit,
A1111 names and grids, embeddings and hypernetworks with their reports, one-line errors, and
`--interactive` picking up an embedding copied in between two prompts (a real subprocess)."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinv_lib.embeddings import Embedding, save_embedding
from tinv_lib.generation import cli as generate_cli
from tinv_lib.generation.cli import main
from tinv_lib.generation.infotext import (
    GenerationParameters,
    format_infotext,
    parameters_from_infotext,
    read_infotext,
)
from tinv_lib.hypernetworks import context_widths, create_hypernetwork, make_options, save_hypernetwork

REPO = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--width", "64", "--height", "64"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dirs(tmp_path):
    """Output, embeddings and hypernetwork folders of one test."""
    paths = {name: tmp_path / name for name in ("out", "grids", "emb", "hn")}
    for path in paths.values():
        path.mkdir()
    return paths


def run(model: Path, dirs: dict, *extra: str) -> int:
    return main(["--model", str(model), "--outdir", str(dirs["out"]), "--outdir_grids", str(dirs["grids"]),
                 "--embeddings_dir", str(dirs["emb"]), "--hypernetwork_dir", str(dirs["hn"]), *FAST, *extra])


def samples(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_same_arguments_same_pixels_names_grids_and_infotext(tiny_sd1_path, dirs, capsys):
    args = ["--prompt", "a red cat, (sunset:1.2)", "--negative_prompt", "blurry", "--seed", "7",
            "--sampler", "Euler a", "--batch_size", "2", "--n_iter", "2"]
    assert run(tiny_sd1_path, dirs, *args) == 0
    assert run(tiny_sd1_path, dirs, *args) == 0
    made = samples(dirs["out"])
    day = made[0].parent.name
    assert [p.relative_to(dirs["out"]).as_posix() for p in made] == [
        f"{day}/{n:05}-{seed}.png" for n, seed in enumerate([7, 8, 9, 10, 7, 8, 9, 10])
    ]
    assert [p.name for p in samples(dirs["grids"])] == ["grid-0000.png", "grid-0001.png"]
    for first, second in zip(made[:4], made[4:]):
        assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(made[0]), pixels(made[1]))
    text = read_infotext(made[3])
    model_hash = text.split("Model hash: ")[1][:10]
    expected = GenerationParameters(
        prompt="a red cat, (sunset:1.2)", negative_prompt="blurry", steps=2, sampler="Euler a",
        schedule_type="Automatic", cfg_scale=7.0, seed=10, width=64, height=64, model_hash=model_hash,
        model="model", rng="CPU", batch_size=2, batch_pos=1, version=generate_cli.VERSION,
    )
    assert parameters_from_infotext(text) == (expected, {})
    assert text == format_infotext(expected)
    assert text.splitlines()[-1].startswith("Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 10, Size: 64x64, Model hash: ")
    grid = Image.open(samples(dirs["grids"])[0])
    assert grid.size == (128, 128) and read_infotext(samples(dirs["grids"])[0]) == read_infotext(made[0])
    assert "Seed:" not in capsys.readouterr().out  # nothing drawn: the seed was given


def test_from_infotext_remakes_an_image_bit_for_bit(tiny_sd1_path, dirs, capsys):
    """With an embedding, a hypernetwork and a batch: image 2 of 3 is made again exactly."""
    save_embedding(Embedding("mystyle", torch.randn(2, 32, generator=torch.Generator().manual_seed(1))),
                   dirs["emb"] / "mystyle.safetensors")
    from testing.tiny import build_tiny_pipeline

    widths = context_widths(build_tiny_pipeline("sd1").unet)
    network = create_hypernetwork("ink", widths, make_options("1, 2, 1", "relu", "XavierNormal"), seed=2)
    save_hypernetwork(network, dirs["hn"] / "ink.pt")
    prompt = "mystyle painting of a house <hypernet:ink:0.7>"
    assert run(tiny_sd1_path, dirs, "--prompt", prompt, "--seed", "20", "--batch_size", "3",
               "--sampler", "DPM++ SDE Karras", "--no_grid") == 0
    out = capsys.readouterr().out
    assert "Embeddings used: mystyle" in out and "Hypernetworks applied: ink (x0.7)" in out
    original = samples(dirs["out"])[1]
    text = read_infotext(original)
    assert "TI hashes: \"mystyle: " in text and "Sampler: DPM++ SDE, Schedule type: Karras" in text
    assert "Seed: 21" in text and "Batch size: 3, Batch pos: 1" in text

    assert run(tiny_sd1_path, dirs, "--from_infotext", str(original)) == 0
    remade = samples(dirs["out"])[-1]
    assert remade.name.endswith("-21.png") and len(samples(dirs["out"])) == 4
    assert np.array_equal(pixels(remade), pixels(original))
    assert read_infotext(remade) == text
    assert "notice" not in capsys.readouterr().out

    # without the hypernetwork the same settings give another image, and the tag is reported
    (dirs["hn"] / "ink.pt").unlink()
    assert run(tiny_sd1_path, dirs, "--from_infotext", str(original)) == 0
    assert "<hypernet:ink:0.7>: no hypernetwork 'ink'" in capsys.readouterr().out
    assert not np.array_equal(pixels(samples(dirs["out"])[-1]), pixels(original))


def test_from_infotext_on_sdxl_and_flag_overrides(tiny_sdxl_path, dirs, capsys):
    assert run(tiny_sdxl_path, dirs, "--prompt", "a blue bird", "--seed", "3", "--sampler", "UniPC") == 0
    original = samples(dirs["out"])[0]
    assert run(tiny_sdxl_path, dirs, "--from_infotext", str(original)) == 0
    assert np.array_equal(pixels(samples(dirs["out"])[1]), pixels(original))
    assert run(tiny_sdxl_path, dirs, "--from_infotext", str(original), "--seed", "4") == 0
    changed = samples(dirs["out"])[2]
    assert changed.name.endswith("-4.png") and "Sampler: UniPC" in read_infotext(changed)


def test_from_infotext_of_another_model_gives_notices(tiny_sd1_path, dirs, tmp_path, capsys):
    text = ("a dog, EasyNegative\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, "
            'Model hash: ffffffffff, Model: other, Clip skip: 2, TI hashes: "EasyNegative: 0123456789ab"')
    (tmp_path / "a1111.txt").write_text(text, encoding="utf-8")
    assert run(tiny_sd1_path, dirs, "--from_infotext", str(tmp_path / "a1111.txt")) == 0
    out = capsys.readouterr().out
    assert "notice: infotext fields not used here: Clip skip: 2" in out
    assert "notice: the image was made with GPU noise" in out
    assert "notice: the image was made with model other [ffffffffff]" in out
    assert "notice: embedding EasyNegative [0123456789ab] of the infotext is not in the embeddings folder" in out
    assert samples(dirs["out"])[0].name.endswith("-5.png")


def test_random_seed_is_drawn_reported_and_recorded(tiny_sd1_path, dirs, capsys):
    assert run(tiny_sd1_path, dirs, "--prompt", "a cat", "--sampler", "Euler") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Seed: "))
    seed = int(line.split()[1])
    made = samples(dirs["out"])
    assert made[0].name == f"00000-{seed}.png" and f"Seed: {seed}," in read_infotext(made[0])


def test_embeddings_report_and_wrong_width_notice(tiny_sd1_path, dirs, capsys):
    save_embedding(Embedding("good", torch.randn(1, 32)), dirs["emb"] / "good.pt")
    save_embedding(Embedding("wide", torch.randn(1, 48)), dirs["emb"] / "sub" / "wide.pt")
    assert run(tiny_sd1_path, dirs, "--prompt", "wide and good", "--seed", "1", "--no_date_dirs") == 0
    out = capsys.readouterr().out
    assert "Textual inversion embeddings loaded(1): good" in out
    assert "Textual inversion embeddings skipped(1):" in out
    assert "wide: width 48 does not fit the loaded model (width 32)" in out
    made = samples(dirs["out"])
    assert [p.name for p in made] == ["00000-1-wide and good.png"]
    assert 'TI hashes: "good: ' in read_infotext(made[0]) and "wide:" not in read_infotext(made[0])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "Eulr"], "error: unknown sampler 'Eulr'; choose one of: DPM++ 2M, DPM++ SDE,"),
        (["--sampler", "DPM fast"], "error: sampler 'DPM fast' is an A1111 sampler with no diffusers equivalent"),
        (["--sampler", "Euler a", "--schedule_type", "Karras"], "error: schedule type Karras is not available with sampler Euler a"),
        (["--width", "60"], "error: --width 60: must be a positive multiple of 8"),
        (["--steps", "0"], "error: --steps must be at least 1 (got 0)"),
        (["--emphasis", "loud"], "error: unknown emphasis mode 'loud'"),
        (["--from_infotext", "nothing.png"], "error: nothing.png: no such file"),
    ],
)
def test_mistakes_are_one_line_errors(tiny_sd1_path, dirs, capsys, extra, message):
    assert run(tiny_sd1_path, dirs, "--prompt", "a cat", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert samples(dirs["out"]) == []


def test_missing_model_path_and_missing_default_model(dirs, tmp_path, monkeypatch, capsys):
    assert run(tmp_path / "no-such-model", dirs, "--prompt", "a cat") == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no-such-model'}: no such model folder or file\n"
    monkeypatch.setattr(generate_cli, "DEFAULT_MODEL", tmp_path / "models" / "toy")
    assert main(["--prompt", "a cat", "--outdir", str(dirs["out"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no --pretrained_model_name_or_path given and the default toy model is missing")
    assert err.count("\n") == 1


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _wait_for(lines: queue.Queue, prefix: str, seen: list[str], timeout: float = 120) -> str:
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, "generate.py ended early:\n" + "\n".join(seen)
        seen.append(line)
        if line.startswith(prefix):
            return line


def test_interactive_uses_an_embedding_copied_in_between_prompts(tiny_sd1_path, tmp_path):
    """Two prompts on stdin; between them an embedding (and a wrong-width one) lands in the
    folder. The second prompt uses it without a restart; the wrong one is reported."""
    emb, out = tmp_path / "emb", tmp_path / "out"
    emb.mkdir()
    staged = save_embedding(Embedding("newstyle", torch.randn(2, 32, generator=torch.Generator().manual_seed(3))),
                            tmp_path / "staged" / "newstyle.pt")
    wrong = save_embedding(Embedding("toowide", torch.randn(1, 48)), tmp_path / "staged" / "toowide.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "generate.py"), "--model", str(tiny_sd1_path), "--interactive",
               "--embeddings_dir", str(emb), "--outdir", str(out), "--seed", "11", "--no_date_dirs", *FAST]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        process.stdin.write("newstyle, a portrait\n")
        process.stdin.flush()
        _wait_for(lines, "saved ", seen)
        shutil.copy(staged, emb / staged.name)
        shutil.copy(wrong, emb / wrong.name)
        process.stdin.write("newstyle, a portrait\n--prompt \"a portrait\" --sampler \"Eulr\"\n")
        process.stdin.close()
        _wait_for(lines, "saved ", seen)
        _wait_for(lines, "error: ", seen)
        assert process.wait(timeout=60) == 1  # one line failed
    finally:
        process.kill()
    stderr = process.stderr.read()
    assert "Traceback" not in stderr and "Traceback" not in "\n".join(seen)
    text = "\n".join(seen)
    assert "Textual inversion embeddings loaded(1): newstyle" in text
    assert "toowide: width 48 does not fit the loaded model (width 32)" in text
    assert "Embeddings used: newstyle" in text
    assert "error: unknown sampler 'Eulr'" in text
    first, second = sorted(out.glob("*.png"))
    assert first.name == "00000-11-newstyle, a portrait.png" and second.name == "00001-11-newstyle, a portrait.png"
    assert "TI hashes" not in read_infotext(first) and 'TI hashes: "newstyle: ' in read_infotext(second)
    assert not np.array_equal(pixels(first), pixels(second))


def test_sd2_v_model_generates_and_remakes_from_its_infotext(tiny_sd2_path, dirs, tmp_path):
    """SD 2.x (v-prediction, 1024-wide text): the same flow as SD1, down to --from_infotext."""
    assert run(tiny_sd2_path, dirs, "--prompt", "a (red:1.1) cat", "--seed", "3", "--sampler", "DPM++ 2M Karras") == 0
    (made,) = samples(dirs["out"])
    assert pixels(made).shape == (64, 64, 3) and pixels(made).std() > 0
    parameters, unknown = parameters_from_infotext(read_infotext(made))
    assert unknown == {}
    assert parameters.seed == 3 and (parameters.sampler, parameters.schedule_type) == ("DPM++ 2M", "Karras")
    again = {**dirs, "out": tmp_path / "again"}
    assert run(tiny_sd2_path, again, "--from_infotext", str(made)) == 0
    (remade,) = samples(again["out"])
    assert np.array_equal(pixels(made), pixels(remade))
