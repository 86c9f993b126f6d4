"""`--report_to tensorboard|wandb|all|none`: real runs on the tiny models, wandb offline
(`WANDB_MODE=offline`), its run folder read back record by record; wandb missing is one line
before the model loads."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, train_argv
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

# wandb is optional at runtime (requirements.txt installs it for the tests); the refusal tests run without it.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


# ---------------------------------------------------------------- reading an offline run back

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list:
    """Every protobuf `Record` of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    records, pending, pos = [], b"", 7  # file header: ":W&B", magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's tail too short for a record header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _finished_records(path: Path, patience: float = 60.0) -> list:
    """The records once the file ends with the run's `exit` record: wandb's service process writes
    the file and may still be flushing it when `finish()` has returned."""
    deadline = time.monotonic() + patience
    while True:
        records = _records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {patience} s"
        time.sleep(0.1)


class OfflineRun:
    """One offline run folder: its `run` record, its config, and its history by step
    (key -> decoded value; nested keys joined with '.', e.g. `preview.filenames`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = list(folder.glob("run-*.wandb"))
        assert len(files) == 1, files
        self.run, self.config, self.history = None, {}, {}
        for record in _finished_records(files[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                self.config.update(_items(record.run.config.update))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "history":
                self.history.setdefault(record.history.step.num, {}).update(_items(record.history.item))

    def values(self, key: str) -> dict[int, object]:
        return {step: row[key] for step, row in sorted(self.history.items()) if key in row}

    def keys(self) -> set[str]:
        return {key for row in self.history.values() for key in row}


def _items(items) -> dict[str, object]:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def _offline_run(wandb_dir: Path) -> OfflineRun:
    folders = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, f"expected one offline run in {wandb_dir / 'wandb'}: {folders}"
    return OfflineRun(folders[0])


def _csv_losses(path: Path) -> dict[int, float]:
    rows = list(csv.DictReader(path.open()))
    return {int(row["step"]): float(row["loss"]) for row in rows}


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- runs


@needs_wandb
def test_report_to_all_sends_every_scalar_and_preview_to_wandb_and_tensorboard(
        wandb_offline, tiny_sd1_path, training_images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinv_lib.training.textual_inversion import main

    out = tmp_path / "my-run"
    code = main(train_argv(tiny_sd1_path, training_images, out, "--report_to", "all", "--max_train_steps", "4",
                           "--log_csv_steps", "1", "--save_steps", "2", "--validation_steps", "2",
                           "--validation_num_inference_steps", "1", "--validation_seed", "1"))
    assert code == 0
    run = _offline_run(out)  # WANDB_DIR unset: the run folder lands beside the outputs
    assert (run.run.project, run.run.display_name) == ("tinv", "my-run")
    assert run.config["placeholder_token"] == "my-thing" and run.config["report_to"] == "all"

    # The loss of every step, as the A1111 CSV has it (7 decimals) and as TensorBoard has it (float32).
    csv_losses = _csv_losses(out / "textual_inversion_loss.csv")
    wandb_losses = run.values("train/loss")
    assert list(wandb_losses) == list(csv_losses) == [1, 2, 3, 4]
    assert {step: round(loss, 7) for step, loss in wandb_losses.items()} == csv_losses
    assert wandb_losses[4] == pytest.approx(csv_losses[4], abs=1e-7)  # the last logged loss is the CSV's last row
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/it_per_s"} <= tags
    assert len(tags) > 4  # the embedding diagnostics too
    for tag in tags:  # every TensorBoard scalar is in wandb, at the same steps, with the same values
        board = {event.step: event.value for event in events.Scalars(tag)}
        logged = run.values(tag)
        assert list(logged) == list(board), tag
        assert list(logged.values()) == pytest.approx(list(board.values()), rel=1e-6), tag
    assert run.values("train/lr") == {step: 0.005 for step in (1, 2, 3, 4)}

    # The previews: the same pictures in both trackers, the prompt beside them.
    previews = run.values("preview.filenames")
    assert list(previews) == [2, 4] and [len(names) for names in previews.values()] == [1, 1]
    assert set(run.values("preview.count").values()) == {1}
    assert set(run.values("preview/prompt")) == {2, 4}
    board_images = {event.step: event for event in events.Images("preview/0")}
    assert list(board_images) == [2, 4]
    for step, (name,) in previews.items():
        picture = Image.open(run.folder / "files" / name)
        assert picture.size == (64, 64)
        board = Image.open(io.BytesIO(board_images[step].encoded_image_string))
        assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(board.convert("RGB"))), step


@needs_wandb
def test_a_hypernetwork_run_reports_to_wandb_alone(wandb_offline, monkeypatch, tiny_sd1_path, training_images,
                                                    tmp_path):
    from tinv_lib.training.hypernetwork import main

    elsewhere = tmp_path / "wandb-home"
    elsewhere.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))  # wandb's own setting wins over the output folder
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")  # and the flag over wandb's
    out = tmp_path / "hn-run"
    code = main(train_argv(tiny_sd1_path, training_images, out, "--report_to", "wandb", "--max_train_steps", "3",
                           "--log_csv_steps", "1", "--tracker_project_name", "hn-project", hypernetwork=True))
    assert code == 0
    assert not (out / "logs").exists() and not (out / "wandb").exists()
    run = _offline_run(elsewhere)
    assert (run.run.project, run.run.display_name) == ("hn-project", "hn-run")
    csv_losses = _csv_losses(out / "hypernetwork_loss.csv")
    assert {step: round(loss, 7) for step, loss in run.values("train/loss").items()} == csv_losses
    assert list(csv_losses) == [1, 2, 3]
    assert {"train/lr", "train/grad_norm", "train/it_per_s"} <= run.keys()


# ---------------------------------------------------------------- wandb not installed


@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_without_wandb_the_run_refuses_in_one_line_before_the_model_loads(report_to, monkeypatch, capsys,
                                                                         tiny_sd1_path, training_images, tmp_path):
    from tinv_lib.training.textual_inversion import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    code = main(train_argv(tiny_sd1_path, training_images, tmp_path, "--report_to", report_to))
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: --report_to {report_to} needs the wandb package: pip install wandb"
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_without_wandb_tensorboard_and_none_need_nothing(monkeypatch, tiny_sd1_path, training_images, tmp_path):
    from tinv_lib.training.textual_inversion import parse_args

    monkeypatch.setitem(sys.modules, "wandb", None)
    for report_to in ("tensorboard", "none"):
        args = parse_args(train_argv(tiny_sd1_path, training_images, tmp_path, "--report_to", report_to))
        assert args.report_to == report_to


def test_a_shadowed_wandb_package_is_refused_from_the_command_line(tiny_sd1_path, training_images, tmp_path):
    """As a user without wandb sees it: the script, a `wandb` that cannot import, one line, exit 2."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "train_textual_inversion.py"),
                           *train_argv(tiny_sd1_path, training_images, tmp_path / "out", "--report_to", "all")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: --report_to all needs the wandb package: pip install wandb"
    assert not (tmp_path / "out").exists()
