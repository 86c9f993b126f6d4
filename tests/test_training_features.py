"""Training features beyond the loop itself: outputs, data handling, precision, SD2, resume from a file."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import train_argv
from PIL import Image

from tinv_lib.embeddings.formats import load_embedding
from tinv_lib.training.data import alpha_weight, bucket_size, build_prompt, caption_for, load_images
from tinv_lib.training.textual_inversion import main


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Every extra on: these tests look at what a full run writes."""
    return train_argv(model, data, out, *extra, off=())


def test_every_output_of_a_run(tiny_sd1_path, training_images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinv_lib.embeddings.image_embed import load_image_embedding

    code = main(_argv(tiny_sd1_path, training_images, tmp_path, "--max_train_steps", "4", "--save_steps", "2",
                      "--validation_steps", "2", "--validation_num_inference_steps", "2", "--log_csv_steps", "1",
                      "--checkpointing_steps", "2", "--validation_seed", "1"))
    assert code == 0
    final = load_embedding(tmp_path / "my-thing.pt")
    assert final.step == 4 and final.name == "my-thing"
    assert torch.equal(load_embedding(tmp_path / "my-thing.safetensors").vectors, final.vectors)
    intermediate = load_embedding(tmp_path / "embeddings" / "my-thing-2.pt")
    assert intermediate.step == 2
    assert torch.load(tmp_path / "embeddings" / "my-thing-2.pt", weights_only=True)["name"] == "my-thing-2"
    assert (tmp_path / "images" / "my-thing-2.png").is_file() and (tmp_path / "images" / "my-thing-4.png").is_file()
    png = load_image_embedding(tmp_path / "image_embeddings" / "my-thing-2.png")
    assert torch.equal(png.vectors, intermediate.vectors)
    rows = list(csv.reader((tmp_path / "textual_inversion_loss.csv").open()))
    assert rows[0] == ["step", "epoch", "epoch_step", "loss", "learn_rate"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[2][1:3] == ["0", "1"] and float(rows[2][4]) == 0.005
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/it_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "preview/0" in events.Tags()["images"]
    settings = json.loads(next(tmp_path.glob("settings-*.json")).read_text())
    assert settings["placeholder_token"] == "my-thing" and settings["num_of_dataset_images"] == 4
    assert len(settings["model_hash"]) == 10
    # What the run wrote is what consumers read: diffusers' own loader, and our embeddings folder.
    from diffusers import StableDiffusionPipeline

    from tinv_lib.embeddings.database import EmbeddingDatabase

    for file in ("my-thing.pt", "my-thing.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_path), safety_checker=None)
        pipe.load_textual_inversion(str(tmp_path / file), token="my-thing")
        ids = pipe.tokenizer.convert_tokens_to_ids(["my-thing"] + [f"my-thing_{i}" for i in range(1, final.vector_count)])
        rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
        assert torch.equal(rows, final.vectors), file
    database = EmbeddingDatabase(tmp_path, expected_dim=final.vectors.shape[1])
    database.refresh()
    assert {"my-thing", "my-thing-2", "my-thing-4"} <= set(database), sorted(database)
    assert torch.equal(database["my-thing"].vectors, final.vectors)


def test_resume_from_embedding_continues_its_step_count(tiny_sd1_path, training_images, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_argv(tiny_sd1_path, training_images, first, "--max_train_steps", "3", "--checkpointing_steps", "0",
                      "--validation_steps", "0", "--save_optimizer_state")) == 0
    assert (first / "my-thing.pt.optim").is_file()
    second = tmp_path / "second"
    assert main(_argv(tiny_sd1_path, training_images, second, "--max_train_steps", "5", "--checkpointing_steps", "0",
                      "--validation_steps", "0", "--resume_from_embedding", str(first / "my-thing.pt"))) == 0
    printed = capsys.readouterr()
    assert "steps 3 -> 5" in printed.out and "does not match" not in printed.err
    assert f"resumed from {first / 'my-thing.pt'} at step 3" in printed.out.splitlines()
    assert load_embedding(second / "my-thing.pt").step == 5
    wrong = tmp_path / "wrong.safetensors"
    from tinv_lib.embeddings.formats import Embedding, save_safetensors

    save_safetensors(Embedding("wrong", torch.zeros(1, 48)), wrong)
    code = main(_argv(tiny_sd1_path, training_images, tmp_path / "third", "--resume_from_embedding", str(wrong)))
    assert code == 2 and "do not fit this model" in capsys.readouterr().err


def test_sd2_bf16_from_the_accelerate_environment_with_checkpointing(tiny_sd2_path, training_images, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    code = main(_argv(tiny_sd2_path, training_images, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "0",
                      "--validation_steps", "0", "--gradient_checkpointing", "--max_grad_norm", "1.0"))
    assert code == 0
    settings = json.loads(next(tmp_path.glob("settings-*.json")).read_text())
    assert settings["mixed_precision"] == "bf16" and settings["model_architecture"] == "sd2"
    saved = load_embedding(tmp_path / "my-thing.pt").vectors
    assert saved.dtype == torch.float32 and saved.shape == (1, 48) and torch.isfinite(saved).all()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    code = main(_argv(tiny_sd2_path, training_images, tmp_path / "no", "--max_train_steps", "1", "--checkpointing_steps", "0",
                      "--validation_steps", "0", "--mixed_precision", "no"))
    assert code == 0
    assert json.loads(next((tmp_path / "no").glob("settings-*.json")).read_text())["mixed_precision"] == "no"


def test_captions_templates_and_tags():
    rng = __import__("random").Random(0)
    assert build_prompt("a photo of [name], [filewords]", " red, circle", "tok", rng, False, 0.0) == "a photo of tok,  red, circle"
    shuffled = {build_prompt("[filewords]", "a,b,c,d", "t", __import__("random").Random(s), True, 0.0) for s in range(20)}
    assert len(shuffled) > 1 and all(sorted(p.split(",")) == ["a", "b", "c", "d"] for p in shuffled)
    dropped = build_prompt("[filewords]", "a,b,c,d,e,f,g,h", "t", __import__("random").Random(1), False, 0.5)
    assert 0 < len(dropped.split(",")) < 8


def test_caption_sources(tmp_path):
    image = tmp_path / "00012-3-a man in a suit.png"
    Image.new("RGB", (8, 8)).save(image)
    assert caption_for(image) == "a man in a suit"
    assert caption_for(image, r"\w+", "_") == "a_man_in_a_suit"
    image.with_suffix(".txt").write_text(" raw caption \n", encoding="utf-8")
    assert caption_for(image) == " raw caption \n"


def test_buckets_alpha_weights_and_bad_files(tmp_path):
    assert bucket_size(64, 64, 64, 16, "buckets") == (64, 64)
    wide = bucket_size(128, 64, 64, 16, "buckets")
    assert wide[0] > wide[1] and wide[0] % 16 == 0 and abs(wide[0] * wide[1] - 64 * 64) <= 64 * 16
    assert bucket_size(128, 64, 64, 16, "crop") == (64, 64)
    alpha = Image.new("L", (64, 64), 0)
    alpha.paste(255, (0, 0, 32, 64))
    weight = alpha_weight(alpha, (8, 8))
    assert weight.min() == 0 and weight.mean().item() == pytest.approx(1.0) and weight[:, :3].min() > 1.5
    rgba = Image.new("RGBA", (128, 64), (255, 0, 0, 255))
    rgba.save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 64)).save(tmp_path / "square.jpg")
    images, skipped, notices = load_images(tmp_path, 64, 16, "buckets", True, 8)
    assert [image.path.name for image in images] == ["square.jpg", "wide.png"]
    assert images[1].size == wide and images[1].weight is not None and images[0].weight is None
    assert skipped == ["broken.png: not an image"] and notices == []


def test_latent_disk_cache_is_reused(tiny_sd1_path, training_images, tmp_path):
    cache = tmp_path / "cache"
    flags = ("--max_train_steps", "1", "--checkpointing_steps", "0", "--validation_steps", "0", "--flip_p", "0.5",
             "--latent_cache_dir", str(cache))
    assert main(_argv(tiny_sd1_path, training_images, tmp_path / "a", *flags)) == 0
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 8  # 4 images x (plain, flipped)
    stamps = [entry.stat().st_mtime_ns for entry in entries]
    assert main(_argv(tiny_sd1_path, training_images, tmp_path / "b", *flags)) == 0
    assert [entry.stat().st_mtime_ns for entry in sorted(cache.glob("*.safetensors"))] == stamps
    assert torch.equal(load_embedding(tmp_path / "a" / "my-thing.pt").vectors, load_embedding(tmp_path / "b" / "my-thing.pt").vectors)


def test_resumed_csv_drops_rows_past_the_checkpoint_and_a_row_cut_by_a_kill(tmp_path):
    """A kill mid-append can leave `12` of `123,...`: on resume at step 20 only whole rows up to
    step 20 stay, so the CSV reads as one uninterrupted run."""
    from argparse import Namespace

    from tinv_lib.training.logs import RunLogger

    path = tmp_path / "textual_inversion_loss.csv"
    rows = "".join(f"{s},0,{s - 1},0.5000000,0.005\n" for s in range(1, 24))
    path.write_text("step,epoch,epoch_step,loss,learn_rate\n" + rows + "12")
    args = Namespace(log_csv_steps=1, report_to="none", max_train_steps=30)
    logger = RunLogger(tmp_path, "textual_inversion", args, True, 100, resume_step=20)
    logger.step(21, 0.25, 0.005, 1.0)
    steps = [row[0] for row in csv.reader(path.open())][1:]
    assert steps == [str(s) for s in range(1, 22)]
