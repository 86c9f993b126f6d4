"""generate.py and train_hypernetwork.py on FLUX.1 and SD3 folders (issue 33): drawing with
embeddings through the model's own flow scheduler, samplers that do not exist for flow matching
and hypernetworks refused in one line before the model loads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tinv_lib.embeddings import Embedding, save_embedding
from tinv_lib.generation.cli import main as generate_main
from tinv_lib.models.loading import save_model_config
from tinv_lib.training.hypernetwork import main as hypernetwork_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def configs_only(tiny_flux_path, tmp_path):
    """The FLUX.1 folder's configs without weights: a check that runs after loading would fail
    on the missing weights instead of saying its one line."""
    return save_model_config(tiny_flux_path, tmp_path / "flux-configs")


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_generate_draws_with_an_embedding_and_the_models_own_sampler(arch, request, tmp_path, capsys):
    model = request.getfixturevalue(f"tiny_{arch}_path")
    widths = {"flux": {"clip_l": 32, "t5": 40}, "sd3": {"clip_l": 32, "clip_g": 48, "t5": 96}}[arch]
    vectors = {key: torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 0.1
               for key, width in widths.items()}
    save_embedding(Embedding("my-thing", vectors), tmp_path / "embeddings" / "my-thing.safetensors")
    code = generate_main(["--pretrained_model_name_or_path", str(model), "--prompt", "a photo of my-thing",
                          "--width", "64", "--height", "64", "--steps", "2", "--seed", "5", "--outdir",
                          str(tmp_path / "out"), "--embeddings_dir", str(tmp_path / "embeddings"), "--no_date_dirs"])
    out = capsys.readouterr().out
    assert code == 0 and "Embeddings used: my-thing" in out
    (saved,) = (tmp_path / "out").glob("*.png")
    info = Image.open(saved).info["parameters"]
    assert "Sampler: Euler," in info and "TI hashes: \"my-thing: " in info and Image.open(saved).size == (64, 64)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a", "Euler Karras"])
def test_samplers_flow_models_lack_are_refused_before_loading(sampler, configs_only, tmp_path, capsys):
    code = generate_main(["--pretrained_model_name_or_path", str(configs_only), "--prompt", "a photo",
                          "--sampler", sampler, "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: sampler '{sampler}' does not exist for flow-matching models")


def test_hypernetworks_are_refused_before_loading(configs_only, training_images, tmp_path, capsys):
    code = generate_main(["--pretrained_model_name_or_path", str(configs_only), "--prompt", "a photo <hypernet:x:1>",
                          "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "hypernetworks act on a UNet's cross-attention" in err[0]
    code = hypernetwork_main(["--pretrained_model_name_or_path", str(configs_only), "--train_data_dir",
                              str(training_images), "--output_dir", str(tmp_path / "hn"), "--hypernetwork_name", "hn",
                              "--resolution", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "FLUX model is a transformer" in err[-1]
    assert not (tmp_path / "hn" / "hn.pt").exists()


def test_sd3_file_with_clip_keys_only_goes_into_the_clip_encoders(tiny_sd3_path, tiny_flux_path, tmp_path):
    """A1111 writes and reads SD3 embeddings with CLIP keys only: such a file is used in CLIP-L and
    CLIP-G, and T5 reads the name as text. FLUX.1 has no CLIP-G, so there it is skipped."""
    from tinv_lib.embeddings.database import EmbeddingDatabase
    from tinv_lib.models.loading import load_base_model
    from tinv_lib.prompts.encoding import PromptEncoder

    generator = torch.Generator().manual_seed(1)
    save_embedding(Embedding("my-thing", {"clip_l": torch.randn(2, 32, generator=generator),
                                          "clip_g": torch.randn(2, 48, generator=generator)}),
                   tmp_path / "my-thing.safetensors")
    for model, usable in ((tiny_sd3_path, True), (tiny_flux_path, False)):
        pipe, _ = load_base_model(model)
        encoder = PromptEncoder.from_pipeline(pipe)
        database = EmbeddingDatabase(tmp_path, expected_dim=encoder.expected_dim)
        database.refresh()
        assert ("my-thing" in database) == usable, database.skipped
    encoder = PromptEncoder.from_pipeline(load_base_model(tiny_sd3_path)[0])
    database = EmbeddingDatabase(tmp_path, expected_dim=encoder.expected_dim)
    database.refresh()
    used = encoder.encode(["a photo of my-thing"], database)
    plain = encoder.encode(["a photo of my-thing"])
    assert used.used and used.used[0].name == "my-thing"
    assert not torch.equal(used.embeds[:, :77], plain.embeds[:, :77])  # the CLIP part: the vectors
    assert torch.equal(used.embeds[:, 77:], plain.embeds[:, 77:])  # the T5 part: the name as text


@pytest.mark.parametrize(("model", "length", "message"), [
    ("sd1", "16", "this SD1 model has no T5 encoder"), ("flux", "600", "must be 2-512, not 600"),
])
def test_a_t5_length_that_cannot_be_used_is_refused_before_loading(model, length, message, request, tmp_path, capsys):
    configs = save_model_config(request.getfixturevalue(f"tiny_{model}_path"), tmp_path / "configs")
    code = generate_main(["--pretrained_model_name_or_path", str(configs), "--prompt", "a photo",
                          "--max_sequence_length", length, "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --max_sequence_length") and message in err[0]


def test_generate_draws_with_a_shorter_t5_prompt(tiny_flux_path, tmp_path, capsys):
    code = generate_main(["--pretrained_model_name_or_path", str(tiny_flux_path), "--prompt", "a red circle",
                          "--max_sequence_length", "16", "--width", "64", "--height", "64", "--steps", "2",
                          "--seed", "5", "--outdir", str(tmp_path / "out"), "--no_date_dirs"])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
