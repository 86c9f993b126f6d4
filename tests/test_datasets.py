"""Training from Hugging Face datasets (`--dataset_name`): every source trains as the same
images in a folder do; the one-line errors; streamed, 2 processes equal 1 and a killed run
resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, train_argv
from helpers_datasets import build_dataset, write_folder, write_imagefolder, write_webdataset

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.training.checkpoints import list_checkpoints
from tinv_lib.training.data import MaskOptions, load_images
from tinv_lib.training.datasets_source import DatasetSpec, ImageSettings, load_dataset_images
from tinv_lib.training.textual_inversion import main, parse_args

COUNT = 8
FLAGS = ("--max_train_steps", "3", "--train_batch_size", "2", "--template_file", "subject_filewords", "--flip_p", "0.5",
         "--learning_rate", "0.01", "--use_alpha_as_loss_weight", "--shuffle_tags", "--seed", "3")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def _argv(model: Path, out: Path, source: list[str], *extra: str) -> list[str]:
    argv = train_argv(model, Path("unused"), out, *FLAGS, *extra, name="tok", initializer="cat")
    at = argv.index("--train_data_dir")
    return argv[:at] + source + argv[at + 2:]


def _hub_cache(root: Path) -> Path:
    """A hub dataset `tinv-tests/toy-shapes` as an earlier online `load_dataset` leaves it in a
    cache folder (prepared arrow data under `<namespace>___<name>/default/<version>/<hash>`)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    build_dataset(COUNT).to_parquet(str(root / "files" / "train-00000.parquet"))
    cache = root / "cache"
    builder = Parquet(cache_dir=str(cache), dataset_name="tinv-tests___toy-shapes", hash="0123456789abcdef",
                      data_files={"train": str(root / "files" / "train-00000.parquet")})
    builder.download_and_prepare()
    (config,) = (cache / "tinv-tests___toy-shapes").iterdir()
    config.rename(config.parent / "default")  # a hub config's folder is its plain name
    for arrow in cache.rglob("tinv-tests___toy-shapes-train.arrow"):
        arrow.rename(arrow.with_name("toy-shapes-train.arrow"))
    return cache


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[list[str], Path]]:
    """Each kind of source: its flags, and the folder holding the same images (with or without masks)."""
    root = tmp_path_factory.mktemp("datasets")
    folder, plain = write_folder(root / "folder", COUNT), write_folder(root / "plain", COUNT, masks=False)
    dataset = build_dataset(COUNT)
    dataset.save_to_disk(str(root / "saved"))
    dataset.to_parquet(str(root / "parquet" / "train-00000.parquet"))
    masks = ["--mask_column", "mask"]
    return {
        "save_to_disk": (["--dataset_name", str(root / "saved"), *masks], folder),
        "parquet folder": (["--dataset_name", str(root / "parquet"), *masks], folder),
        "parquet glob": (["--dataset_name", str(root / "parquet" / "*.parquet"), *masks], folder),
        "arrow files": (["--dataset_name", str(root / "saved" / "*.arrow"), *masks], folder),
        "imagefolder metadata.jsonl": (["--dataset_name", str(write_imagefolder(root / "imagefolder", COUNT)), *masks],
                                       folder),
        "webdataset shards": (["--dataset_name", str(write_webdataset(root / "webdataset", COUNT)),
                               "--image_column", "png", "--caption_column", "txt"], plain),
        "hub cache, offline": (["--dataset_name", "tinv-tests/toy-shapes", "--cache_dir", str(_hub_cache(root / "hub")),
                                *masks], folder),
    }


SOURCES = ["save_to_disk", "parquet folder", "parquet glob", "arrow files", "imagefolder metadata.jsonl",
           "webdataset shards", "hub cache, offline"]


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_gives_the_folders_records(source, sources):
    flags, folder = sources[source]
    args = parse_args(["--pretrained_model_name_or_path", str(ROOT), "--placeholder_token", "tok",
                       "--resolution", "64", *flags])
    settings = ImageSettings(64, 8, "buckets", True, 8, MaskOptions(None, None))
    from_dataset, skipped, _ = load_dataset_images(DatasetSpec.from_args(args), settings)
    from_folder, _, _ = load_images(folder, 64, 8, "buckets", True, 8)
    assert not skipped and len(from_dataset) == len(from_folder) == COUNT
    for got, want in zip(from_dataset, from_folder, strict=True):
        assert (got.caption, got.size) == (want.caption, want.size)
        assert torch.equal(got.pixels, want.pixels)
        assert (got.weight is None) == (want.weight is None)
        assert got.weight is None or torch.equal(got.weight, want.weight)
    weighted = sum(image.weight is not None for image in from_dataset)
    assert weighted == (2 if folder.name == "plain" else 6)  # alpha on rows 3 and 7; masks on the even rows


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_trains_as_its_folder(source, sources, tiny_sd1_path, tmp_path):
    """Same batches (buckets, captions, masks, alpha, flips, validation split) → the same embedding, bit for bit."""
    flags, folder = sources[source]
    extra = ("--validation_split", "0.25", "--validation_loss_steps", "1")
    assert main(_argv(tiny_sd1_path, tmp_path / "folder", ["--train_data_dir", str(folder)], *extra)) == 0
    assert main(_argv(tiny_sd1_path, tmp_path / "dataset", flags, *extra)) == 0
    want, got = load_embedding(tmp_path / "folder" / "tok.pt"), load_embedding(tmp_path / "dataset" / "tok.pt")
    assert torch.equal(want.vectors, got.vectors)
    validation = [(tmp_path / run / "validation_loss.csv").read_text() for run in ("folder", "dataset")]
    assert validation[0] == validation[1] and validation[0].count("\n") == 4


def test_the_hypernetwork_trainer_reads_datasets_too(sources, tiny_sd1_path, tmp_path):
    from tinv_lib.hypernetworks import load_hypernetwork
    from tinv_lib.training.hypernetwork import main as train_hypernetwork

    flags, folder = sources["parquet folder"]
    runs = {"folder": ["--train_data_dir", str(folder)], "dataset": flags}
    for run, source in runs.items():
        argv = train_argv(tiny_sd1_path, folder, tmp_path / run, *FLAGS, name="hn", hypernetwork=True)
        at = argv.index("--train_data_dir")
        assert train_hypernetwork(argv[:at] + source + argv[at + 2:]) == 0
    want, got = (load_hypernetwork(tmp_path / run / "hn.pt").state_dict() for run in runs)
    assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want)


def test_latent_cache_is_keyed_by_the_datasets_fingerprint(sources, tiny_sd1_path, tmp_path):
    cache = tmp_path / "latents"
    flags = [*sources["save_to_disk"][0], "--latent_cache_dir", str(cache)]
    assert main(_argv(tiny_sd1_path, tmp_path / "a", flags)) == 0
    first = sorted(path.name for path in cache.iterdir())
    assert len(first) == 2 * COUNT  # each image and its mirror
    assert main(_argv(tiny_sd1_path, tmp_path / "b", flags)) == 0
    assert sorted(path.name for path in cache.iterdir()) == first  # read back, not encoded again
    other = tmp_path / "other"
    build_dataset(COUNT).select(range(1, COUNT)).save_to_disk(str(other))  # other data: another fingerprint
    assert main(_argv(tiny_sd1_path, tmp_path / "c", ["--dataset_name", str(other), "--mask_column", "mask",
                                                      "--latent_cache_dir", str(cache)])) == 0
    assert len(list(cache.iterdir())) == 2 * COUNT + 2 * (COUNT - 1)


# ------------------------------------------------------------------------------ errors


def _broken_datasets(root: Path) -> dict[str, Path]:
    import datasets

    strings = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "text": ["a", "b"]})
    strings.save_to_disk(str(root / "strings"))
    build_dataset(2).select([]).to_parquet(str(root / "empty" / "train-00000.parquet"))
    return {"strings": root / "strings", "empty": root / "empty"}


def test_bad_datasets_are_one_line_errors_before_the_model_loads(sources, tmp_path, capsys):
    broken = _broken_datasets(tmp_path)
    saved = sources["save_to_disk"][0][1]
    missing_model = tmp_path / "no-model-needed"  # errors come before the model would load
    missing_model.mkdir()
    cases = [
        (["--dataset_name", "nobody/no-such-set"], "--dataset_name nobody/no-such-set: no such folder or file, and "
                                                   "not a hub dataset in the default cache"),
        (["--dataset_name", saved, "--caption_column", "prompt"],
         "--caption_column prompt: no such column in " + saved + " (its columns: image, text, mask)"),
        (["--dataset_name", saved, "--mask_column", "masks"], "--mask_column masks: no such column"),
        (["--dataset_name", str(broken["strings"])], "--image_column image: the column holds no images (string)"),
        (["--dataset_name", str(broken["empty"])], "split 'train' is empty"),
        (["--dataset_name", str(broken["empty"]), "--streaming", "--aspect_mode", "crop"], "split 'train' is empty"),
        (["--dataset_name", saved, "--dataset_split", "test"], "--dataset_split test"),
        (["--dataset_name", saved, "--train_data_dir", str(tmp_path)], "give one"),
        ([], "--train_data_dir (a folder) or --dataset_name (a dataset)"),
        (["--train_data_dir", str(tmp_path), "--streaming"], "--streaming: only for --dataset_name"),
        (["--dataset_name", saved, "--streaming", "--train_batch_size", "2"], "use --aspect_mode crop or stretch"),
        (["--dataset_name", saved, "--streaming", "--validation_split", "0.2"], "--validation_data_dir"),
        (["--dataset_name", saved, "--filename_word_regex", r"\w+"], "a dataset's captions are a column"),
    ]
    for flags, message in cases:
        code = main(["--pretrained_model_name_or_path", str(missing_model), "--placeholder_token", "tok",
                     "--resolution", "64", "--output_dir", str(tmp_path / "out"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, flags
        assert err[-1].startswith("error: ") and message in err[-1], (flags, err)
        assert not (tmp_path / "out").exists()


def _with_corrupt_row(root: Path, count: int, bad: int) -> Path:
    """The set saved to disk, row `bad` replaced by bytes that are no image."""
    import datasets

    dataset = build_dataset(count).cast_column("image", datasets.Image(decode=False))
    rows = dataset.to_dict()
    rows["image"][bad] = {"bytes": b"not a png", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=dataset.features).cast_column("image", datasets.Image())
    broken.save_to_disk(str(root))
    return root


def test_a_corrupt_row_is_skipped_with_a_notice(tiny_sd1_path, tmp_path, capsys):
    saved = _with_corrupt_row(tmp_path / "broken", COUNT, 5)
    assert main(_argv(tiny_sd1_path, tmp_path / "run", ["--dataset_name", str(saved)])) == 0
    output = capsys.readouterr()
    assert "skipped row 5: not an image" in output.err
    assert f"{COUNT - 1} images" in output.out
    assert main(_argv(tiny_sd1_path, tmp_path / "stream", ["--dataset_name", str(saved), "--streaming", "--aspect_mode",
                                                               "crop"])) == 0
    assert "skipped row 5: not an image" in capsys.readouterr().err


# ------------------------------------------------------------------------------ streaming

STREAM_FLAGS = ("--streaming", "--aspect_mode", "crop", "--mask_column", "mask", "--checkpointing_steps", "2")


def _launch(processes: int, argv: list[str]) -> subprocess.Popen:
    script = str(ROOT / "train_textual_inversion.py")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 \
        else [sys.executable]
    return subprocess.Popen([*prefix, script, *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def test_a_streamed_run_on_two_processes_equals_one_process(tiny_sd1_path, tmp_path):
    """The same global batches in the same order (rows, positions, flips, noise) → the same
    embedding up to the all-reduce's rounding; a corrupt row is replaced alike on both; a
    checkpoint written by 2 processes resumes on 1."""
    saved = _with_corrupt_row(tmp_path / "set", COUNT, 2)
    flags = ["--dataset_name", str(saved)]
    one = _launch(1, _argv(tiny_sd1_path, tmp_path / "one", flags, *STREAM_FLAGS, "--max_train_steps", "5",
                           "--train_batch_size", "4", "--adam_epsilon", "1e-4"))
    output_one = _finish(one)
    two = _launch(2, _argv(tiny_sd1_path, tmp_path / "two", flags, *STREAM_FLAGS, "--max_train_steps", "5",
                           "--train_batch_size", "2", "--adam_epsilon", "1e-4"))
    output_two = _finish(two)
    assert "skipped row 2" in output_one and "skipped row 2" in output_two
    a, b = load_embedding(tmp_path / "one" / "tok.pt").vectors, load_embedding(tmp_path / "two" / "tok.pt").vectors
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    states = [json.loads((tmp_path / run / "checkpoint-4" / "stream.json").read_text()) for run in ("one", "two")]
    assert states[0] == states[1] and (states[0]["epoch"], states[0]["row"]) == (1, 8)  # 4 steps x 4 rows read
    # The position is the same on every process count: the 2-process checkpoint resumes on 1 process.
    shutil.copytree(tmp_path / "two" / "checkpoint-4", tmp_path / "moved" / "checkpoint-4")
    _finish(_launch(1, _argv(tiny_sd1_path, tmp_path / "moved", flags, *STREAM_FLAGS, "--max_train_steps", "5",
                             "--train_batch_size", "4", "--adam_epsilon", "1e-4", "--resume_from_checkpoint", "latest")))
    assert torch.allclose(a, load_embedding(tmp_path / "moved" / "tok.pt").vectors, atol=1e-5, rtol=0)


RESUME_STEPS = 24  # many steps after the first checkpoint, so the kill lands mid-run (several epochs of 10 rows)


def test_a_killed_stream_resumes_as_the_uninterrupted_run(tiny_sd1_path, tmp_path):
    files = tmp_path / "parquet"
    build_dataset(10).to_parquet(str(files / "train-00000.parquet"))
    build_dataset(13).select(range(10, 13)).to_parquet(str(files / "train-00001.parquet"))  # two shards, 13 rows
    flags = ["--dataset_name", str(files)]
    argv = lambda out: _argv(tiny_sd1_path, out, flags, *STREAM_FLAGS, "--max_train_steps", str(RESUME_STEPS),  # noqa: E731
                             "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--save_steps", "0")
    _finish(_launch(1, argv(tmp_path / "whole")))
    killed = _launch(1, argv(tmp_path / "killed"))
    while not list_checkpoints(tmp_path / "killed") and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at = int(list_checkpoints(tmp_path / "killed")[-1].name.split("-")[1])
    assert at < RESUME_STEPS
    output = _finish(_launch(1, [*argv(tmp_path / "killed"), "--resume_from_checkpoint", "latest"]))
    assert f"at step {at}" in output
    whole, resumed = (load_embedding(tmp_path / run / "tok.pt") for run in ("whole", "killed"))
    assert resumed.step == RESUME_STEPS and torch.allclose(whole.vectors, resumed.vectors, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ preprocess.py


def test_preprocess_writes_a_dataset_that_trains_as_its_folder(training_images, tiny_sd1_path, tmp_path, capsys):
    from tinv_lib.preprocessing.cli import main as preprocess

    dest = tmp_path / "prepared"
    assert preprocess(["--source_dir", str(training_images), "--dest_dir", str(dest), "--width", "64", "--height", "64",
                       "--flip", "--existing_caption", "copy", "--output_format", "dataset"]) == 0
    assert f"train with --dataset_name {dest / 'dataset'}" in capsys.readouterr().out
    import datasets

    saved = datasets.load_from_disk(str(dest / "dataset"))
    assert saved.column_names == ["image", "text", "file_name"] and len(saved) == 8
    assert "red, circle, white background" in saved["text"] and "a green circle" in saved["text"]  # sidecar, file name
    assert main(_argv(tiny_sd1_path, tmp_path / "folder", ["--train_data_dir", str(dest)])) == 0
    assert main(_argv(tiny_sd1_path, tmp_path / "dataset", ["--dataset_name", str(dest / "dataset")])) == 0
    want, got = (load_embedding(tmp_path / run / "tok.pt").vectors for run in ("folder", "dataset"))
    assert torch.equal(want, got)
    assert preprocess(["--source_dir", str(training_images), "--dest_dir", str(tmp_path / "plain"), "--width", "64",
                       "--height", "64"]) == 0
    assert not (tmp_path / "plain" / "dataset").exists()  # a folder stays the default
