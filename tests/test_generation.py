"""Generation with embeddings: our files in diffusers' own `load_textual_inversion` give the
same image as our prompt encoding; the identity property on images; extra-network hooks;
the embeddings folder, TI hashes and the model-mismatch notice."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers_embeddings import tiny_pipeline
from safetensors.torch import load_file

from tinv_lib.embeddings import Embedding, load_embedding, save_embedding
from tinv_lib.embeddings.create import create_embedding
from tinv_lib.embeddings.database import EmbeddingDatabase
from tinv_lib.generation.txt2img import generate
from tinv_lib.models.family import family_of

STEPS, SIZE = 2, 64


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def theirs_image(pipe, prompt: str, seed: int) -> np.ndarray:
    """diffusers' own path: the pipeline tokenizes and encodes the prompt itself."""
    with torch.no_grad():
        image = pipe(
            prompt, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE, width=SIZE,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    return pixels(image)


def ours_image(pipe, prompt: str, seed: int, embeddings=None, **kwargs) -> np.ndarray:
    result = generate(pipe, prompt, seed=seed, steps=STEPS, cfg_scale=7.0, width=SIZE, height=SIZE,
                      embeddings=embeddings, **kwargs)
    return pixels(result.images[0])


@pytest.fixture(scope="module")
def fresh_pipeline():
    """diffusers' loader changes the tokenizer and text encoder, so it gets pipelines of its own."""
    from testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sd1_file_we_write_loads_in_diffusers_and_gives_our_image(tmp_path, fresh_pipeline, suffix):
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    path = save_embedding(Embedding("mystyle", vectors, step=10), tmp_path / f"mystyle{suffix}")
    theirs = fresh_pipeline("sd1")
    theirs.load_textual_inversion(str(path), token="mystyle")
    prompt = "a painting of a cat, mystyle"
    expected = theirs_image(theirs, prompt, seed=3)
    ours = ours_image(tiny_pipeline("sd1"), prompt, 3, {"mystyle": load_embedding(path)})
    assert np.array_equal(ours, expected)
    assert not np.array_equal(ours, ours_image(tiny_pipeline("sd1"), "a painting of a cat, tree", 3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_file_we_write_loads_in_diffusers_with_two_calls(tmp_path, fresh_pipeline, suffix):
    """Both files hold `clip_l` and `clip_g` (the keys A1111, ComfyUI and kohya read); a diffusers
    user loads each with one `load_textual_inversion` per encoder and gets tinv's images."""
    from tinv_lib.common.torch_files import safe_torch_load

    generator = torch.Generator().manual_seed(8)
    vectors = {"clip_l": torch.randn(3, 32, generator=generator), "clip_g": torch.randn(3, 48, generator=generator)}
    path = save_embedding(Embedding("xlstyle", vectors), tmp_path / f"xlstyle{suffix}")
    theirs = fresh_pipeline("sdxl")
    state = load_file(path) if suffix == ".safetensors" else safe_torch_load(path)
    assert set(state) >= {"clip_l", "clip_g"}
    theirs.load_textual_inversion(state["clip_l"], token="xlstyle", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(
        state["clip_g"], token="xlstyle", text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
    )
    prompt = "xlstyle photo of a dog"
    expected = theirs_image(theirs, prompt, seed=4)
    assert np.array_equal(ours_image(tiny_pipeline("sdxl"), prompt, 4, {"xlstyle": load_embedding(path)}), expected)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize(("init_text", "vectors"), [("tree", 1), ("a red tree", 3)])
def test_identity_property_on_images(arch, init_text, vectors):
    pipe = tiny_pipeline(arch)
    embedding = create_embedding("fresh", family_of(pipe), init_text, vectors)
    image = ours_image(pipe, "fresh in a field", 11, {"fresh": embedding})
    assert np.array_equal(image, ours_image(pipe, f"{init_text} in a field", 11))
    # ...and the model does listen to the text: other words give another picture.
    assert not np.array_equal(image, ours_image(pipe, "a blue dog in a field", 11))


def test_extra_network_handlers_and_unknown_tags():
    """The hook later used for `<hypernet:name:mult>`: tags leave the prompt text, handlers get
    their arguments and are active while sampling; unknown kinds are reported and skipped."""
    pipe, calls, active = tiny_pipeline("sd1"), [], []

    @contextlib.contextmanager
    def handler(given_pipe, args):
        calls.append((given_pipe is pipe, args))
        active.append(True)
        yield
        active.pop()

    original_call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        assert active == [True]
        return original_call(self, *args, **kwargs)

    type(pipe).__call__ = spy
    try:
        result = generate(pipe, "a cat <hypernet:anime:0.5> <hypernet:ink> <lora:x:1>", steps=STEPS, seed=2,
                          extra_networks={"hypernet": handler})
    finally:
        type(pipe).__call__ = original_call
    assert calls == [(True, [["anime", "0.5"], ["ink"]])]
    assert result.notices == ["Skipping unknown extra network: lora"]
    assert np.array_equal(pixels(result.images[0]), ours_image(pipe, "a cat   ", 2))


def test_folder_database_hashes_notices_and_batch_seeds(tmp_path):
    pipe = tiny_pipeline("sd1")
    save_embedding(Embedding("Neg:Thing", torch.randn(2, 32), sd_checkpoint="ffffffffff", sd_checkpoint_name="other"),
                   tmp_path / "negthing.pt")
    db = EmbeddingDatabase(tmp_path, expected_dim=32, model_hashes=["0000000000"], model_name="tiny")
    result = generate(pipe, "a cat", "negthing", seed=5, steps=STEPS, batch_size=2, embeddings=db)
    assert [emb.name for emb in result.used_embeddings] == ["negthing"]
    assert result.ti_hashes == f"negthing: {db['negthing'].shorthash}" and len(db["negthing"].shorthash) == 12
    assert len(result.notices) == 1 and "other [ffffffffff]" in result.notices[0]
    single = generate(pipe, "a cat", "negthing", seed=6, steps=STEPS, embeddings=db)
    assert single.notices == []  # once per embedding
    # image i uses seed + i (a batch of 2 is not bit-identical to a batch of 1: float reductions)
    difference = np.abs(pixels(result.images[1]).astype(int) - pixels(single.images[0]))
    assert difference.max() <= 2 and not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))
    save_embedding(Embedding("later", torch.randn(1, 32)), tmp_path / "sub" / "later.safetensors")
    assert [e.name for e in generate(pipe, "later", steps=STEPS, embeddings=db).used_embeddings] == ["later"]


def test_database_without_model_width_takes_the_pipelines(tmp_path):
    save_embedding(Embedding("wide", torch.randn(1, 48)), tmp_path / "wide.pt")
    db = EmbeddingDatabase(tmp_path)
    result = generate(tiny_pipeline("sd1"), "wide", steps=STEPS, embeddings=db)
    assert result.used_embeddings == [] and "does not fit" in next(iter(db.skipped.values()))
