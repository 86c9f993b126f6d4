"""The mistakes a new user made (issue 37), each answered by one line, and what a run leaves behind.

Each mistake that can be known from the flags and the files they name stops before the model
loads (`parse_args` raises, exit status 2); one that can only be seen once the model is loaded
(an old checkpoint that does not record what it needs) stops with one line naming what differs.
Either way nothing is written. Training checkpoints never pass for embeddings or hypernetworks,
status lines start on their own line when the output goes to a file, and multi-process runs leave
nothing in the system's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, train_argv

from tinv_lib.training.preflight import ArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model: Path, data: Path, out: Path, *extra: str) -> None:
    from tinv_lib.training.textual_inversion import main

    assert main(train_argv(model, data, out, "--max_train_steps", "2", "--checkpointing_steps", "2", *extra)) == 0


def _forget_the_record(checkpoint: Path) -> None:
    """Make `checkpoint` look like one written before checkpoints recorded their model and shapes."""
    meta = json.loads((checkpoint / "state.json").read_text())
    for key in ("architecture", "tensors"):
        meta.pop(key, None)
    (checkpoint / "state.json").write_text(json.dumps(meta))


def _files(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def _one_error_line(err: str) -> str:
    """The one line a mistake gets (the libraries' model-loading bars aside)."""
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+/\d+ \[", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def sd1_run(tiny_sd1_path, training_images, tmp_path_factory) -> Path:
    """A textual-inversion run on the tiny SD1 model with 4 vectors and a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("sd1-run") / "run"
    _train(tiny_sd1_path, training_images, out, "--num_vectors", "4")
    return out


def test_a_checkpoint_records_the_architecture_and_the_trained_shapes(sd1_run):
    meta = json.loads((sd1_run / "checkpoint-2" / "state.json").read_text())
    assert meta["architecture"] == "sd1" and meta["tensors"] == {"emb_params": [4, 32]}


def test_resuming_with_another_architecture_is_refused_before_the_model_loads(sd1_run, tiny_sdxl_path,
                                                                              training_images):
    argv = train_argv(tiny_sdxl_path, training_images, sd1_run, "--num_vectors", "4", "--max_train_steps", "4",
                      "--resume_from_checkpoint", "latest")
    from tinv_lib.training.textual_inversion import parse_args

    with pytest.raises(ArgumentError, match="checkpoint-2 was trained on an SD1 model") as refused:
        parse_args(argv)
    assert "SDXL" in str(refused.value) and "\n" not in str(refused.value)


def test_resuming_with_another_vector_count_is_refused_before_the_model_loads(sd1_run, tiny_sd1_path,
                                                                              training_images):
    from tinv_lib.training.textual_inversion import parse_args

    argv = train_argv(tiny_sd1_path, training_images, sd1_run, "--num_vectors", "2", "--max_train_steps", "4",
                      "--resume_from_checkpoint", "latest")
    with pytest.raises(ArgumentError, match=r"checkpoint-2 holds 4 vectors .* --num_vectors 2"):
        parse_args(argv)


@pytest.mark.parametrize("model, vectors, differs", [
    ("sdxl", "4", r"checkpoint-2 holds emb_params \[4, 32\]; this run trains clip_l \[4, 32\], clip_g \[4, 48\]"),
    ("sd1", "2", r"checkpoint-2 holds emb_params \[4, 32\]; this run trains emb_params \[2, 32\]"),
])
def test_an_old_checkpoint_that_does_not_fit_gets_one_line_and_nothing_is_written(
        model, vectors, differs, sd1_run, tiny_sd1_path, tiny_sdxl_path, training_images, tmp_path, capsys):
    import shutil

    from tinv_lib.training.textual_inversion import main

    out = tmp_path / "old"
    shutil.copytree(sd1_run, out)
    _forget_the_record(out / "checkpoint-2")
    before = _files(out)
    path = tiny_sdxl_path if model == "sdxl" else tiny_sd1_path
    capsys.readouterr()
    code = main(train_argv(path, training_images, out, "--num_vectors", vectors, "--max_train_steps", "4",
                           "--resume_from_checkpoint", "latest"))
    assert code == 2
    assert re.search(differs, _one_error_line(capsys.readouterr().err))
    assert _files(out) == before


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(tiny_sd1_path, training_images, tmp_path,
                                                                        capsys):
    from tinv_lib.training.textual_inversion import main, parse_args

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for out in (taken, taken / "run"):
        with pytest.raises(ArgumentError, match=f"--output_dir {re.escape(str(out))}: .*notes.txt is a file"):
            parse_args(train_argv(tiny_sd1_path, training_images, out))
    capsys.readouterr()
    assert main(train_argv(tiny_sd1_path / "missing", training_images, taken)) == 2
    assert "--output_dir" in _one_error_line(capsys.readouterr().err)
    assert taken.read_text() == "mine"


def test_a_placeholder_with_a_space_is_taken_with_a_note_on_how_to_type_it(tiny_sd1_path, training_images,
                                                                           tmp_path, capsys):
    from tinv_lib.training.textual_inversion import parse_args

    args = parse_args(train_argv(tiny_sd1_path, training_images, tmp_path, name="my thing"))
    assert args.placeholder_token == "my thing"
    note = capsys.readouterr().err.strip()
    assert note.startswith("notice: ") and "'my thing'" in note and "space" in note and "\n" not in note
    parse_args(train_argv(tiny_sd1_path, training_images, tmp_path, name="my-thing"))
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------ training folders as sources


@pytest.fixture(scope="module")
def busy_run(tiny_sd1_path, training_images, tmp_path_factory) -> Path:
    """A run with everything a run writes: intermediate files, previews, PNG embeddings, checkpoints."""
    out = tmp_path_factory.mktemp("busy") / "run"
    _train(tiny_sd1_path, training_images, out, "--max_train_steps", "4", "--save_steps", "2",
           "--validation_steps", "2", "--validation_num_inference_steps", "1", "--num_vectors", "2")
    assert (out / "checkpoint-2" / "trainable.safetensors").is_file()
    return out


def test_the_embeddings_folder_never_reads_a_training_checkpoint(busy_run):
    from tinv_lib.embeddings.database import EmbeddingDatabase

    database = EmbeddingDatabase(busy_run, expected_dim=32)
    database.refresh()
    assert "trainable" not in database
    assert database.errors == {}
    mentioned = [*database.skipped, *database.errors]
    assert not [path for path in mentioned if "checkpoint-" in path], mentioned
    assert {"my-thing", "my-thing-2"} <= set(database)


def test_a_checkpoint_file_named_on_its_own_says_what_it_is(busy_run):
    from tinv_lib.embeddings.formats import NotAnEmbeddingError, load_embedding

    with pytest.raises(NotAnEmbeddingError, match="training checkpoint"):
        load_embedding(busy_run / "checkpoint-4" / "trainable.safetensors")


def test_the_hypernetworks_folder_never_lists_a_training_checkpoint(busy_run):
    from tinv_lib.hypernetworks import list_hypernetworks

    assert not {"optimizer", "scaler"} & set(list_hypernetworks(busy_run))


def test_the_readme_points_generate_at_folders_of_embeddings_only():
    """A training output folder also holds intermediate files and previews: the README's
    generate commands read folders that hold what the user means."""
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python generate.py")]
    assert [line for line in commands if "--embeddings_dir" in line]
    assert not [line for line in commands if re.search(r"--(embeddings|hypernetwork)_dir output/", line)]


# ----------------------------------------------------------------------------------- generate.py


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["--width", "63"], "--width 63: must be a positive multiple of 8"),
    (["--batch_size", "0"], "--batch_size must be at least 1 (got 0)"),
])
def test_generate_checks_its_numbers_before_the_model_loads(flags, message, tmp_path, capsys):
    from tinv_lib.generation.cli import main

    assert main(["--model", str(tmp_path / "no-model"), "--prompt", "a cat", *flags]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {message}"


def test_diagnosing_an_sdxl_pt_prints_no_unknown_step(tiny_sdxl_path, tmp_path, capsys):
    from tinv_lib.embeddings import Embedding
    from tinv_lib.embeddings.__main__ import main
    from tinv_lib.embeddings.formats import save_pt

    generator = torch.Generator().manual_seed(0)
    vectors = {"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 48, generator=generator)}
    path = save_pt(Embedding("xl", vectors, step=5), tmp_path / "xl.pt")
    assert main(["inspect", "--diagnose", str(path), "--model", str(tiny_sdxl_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "None" not in first and first == f"{path}: xl (sdxl-pt, no step recorded)"


# ------------------------------------------------------------------------------- output in a file

STATUS = ("Saved step", "my-thing emb_params[0]: norm", "Done in ")


def test_status_lines_start_on_their_own_line_in_a_log_file(tiny_sd1_path, training_images, tmp_path):
    """As with `nohup python train_textual_inversion.py ... > train.log 2>&1`."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    argv = train_argv(tiny_sd1_path, training_images, out, "--max_train_steps", "3", "--save_steps", "2",
                      "--checkpointing_steps", "3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, str(ROOT / "train_textual_inversion.py"), *argv], env=env,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    for status in (*STATUS, "*****"):
        at = text.index(status)
        assert at == 0 or text[at - 1] == "\n", f"{status!r} glued to: {text[max(0, at - 80):at + 20]!r}"
    last = text.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(rf"Done in \d+(\.\d)? s \(model loading included\): step 3, files in {re.escape(str(out))}",
                        last), last


def test_a_run_with_progress_bars_turned_off_trains_to_the_end(tiny_sd1_path, training_images, tmp_path):
    """`TQDM_DISABLE=1` (cloud logs, CI) gives a bar without a clock: the run must not crash on it."""
    out = tmp_path / "run"
    argv = train_argv(tiny_sd1_path, training_images, out, "--max_train_steps", "3")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "train_textual_inversion.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Done in " in done.stdout + done.stderr and not list(out.glob("crash-*.log"))


# ------------------------------------------------------------------------- what the suite leaves behind


def test_passing_tests_leave_no_temporary_folders(pytestconfig):
    """pytest keeps the temporary folders of failed tests only, and of the last session only."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) == 1


def test_torchrun_leaves_nothing_in_the_system_temporary_folder(tmp_path):
    """torchrun writes its logs to a new `torchelastic_*` folder in the temporary folder; the
    suite points subprocesses' temporary folder into its own (conftest), which pytest removes."""
    script = tmp_path / "hello.py"
    script.write_text("print('hello')\n")
    system = Path(tempfile.gettempdir())
    before = set(system.glob("torchelastic_*"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script)],
                          env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "hello" in done.stdout, done.stderr
    assert set(system.glob("torchelastic_*")) - before == set()
    assert list(Path(os.environ["TMPDIR"]).glob("torchelastic_*/*/attempt_0"))
