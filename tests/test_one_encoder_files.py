"""Embedding files with one encoder's vectors alone (issue 33): a FLUX.1 file with only `clip_l`
(CLIP-only training in diffusers' advanced Flux script writes `clip_l` alone; Forge has no T5)
goes into CLIP-L, and T5 reads the name as text, as diffusers' one `load_textual_inversion` into
the CLIP encoder gives; a one-encoder model takes it as A1111 takes any one-tensor file; SDXL,
as A1111, skips it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tinv_lib.embeddings import load_embedding, save_embedding
from tinv_lib.embeddings.database import EmbeddingDatabase
from tinv_lib.models.loading import load_base_model
from tinv_lib.prompts.encoding import PromptEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = ["a photo of my-thing on a red tree"]


def _database(folder, encoder: PromptEncoder) -> EmbeddingDatabase:
    database = EmbeddingDatabase(folder, expected_dim=encoder.expected_dim)
    database.refresh()
    return database


def test_a_flux_file_with_clip_l_only_goes_into_clip_l_and_t5_reads_the_name(tiny_flux_path, tmp_path):
    from diffusers import FluxPipeline

    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    for folder in ("st", "pt"):
        (tmp_path / folder).mkdir()
    save_file({"clip_l": vectors}, tmp_path / "st" / "my-thing.safetensors")
    torch.save({"clip_l": vectors, "step": 7}, tmp_path / "pt" / "my-thing.pt")
    for path in (tmp_path / "st" / "my-thing.safetensors", tmp_path / "pt" / "my-thing.pt"):
        embedding = load_embedding(path)
        assert embedding.format == f"clip_l-only-{path.suffix[1:]}" and embedding.dim == {"clip_l": 32}
        assert torch.equal(embedding.vectors["clip_l"], vectors) and embedding.vector_count == 1
    assert load_embedding(tmp_path / "pt" / "my-thing.pt").step == 7

    pipe, _ = load_base_model(tiny_flux_path)
    encoder = PromptEncoder.from_pipeline(pipe)
    database = _database(tmp_path / "st", encoder)
    assert "my-thing" in database and not database.skipped
    used, plain = encoder.encode(PROMPT, database), encoder.encode(PROMPT)
    assert [embedding.name for embedding in used.used] == ["my-thing"]
    assert not torch.equal(used.pooled, plain.pooled)  # CLIP-L's pooled text: the vectors
    assert torch.equal(used.embeds, plain.embeds)  # T5's sequence: the name as text

    theirs = FluxPipeline.from_pretrained(tiny_flux_path)
    theirs.load_textual_inversion(vectors, token="my-thing", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    embeds, pooled, _ = theirs.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
    assert torch.equal(used.embeds, embeds) and torch.equal(used.pooled, pooled)


def test_a_t5_only_file_goes_into_t5_alone(tiny_flux_path, tmp_path):
    vectors = torch.randn(2, 40, generator=torch.Generator().manual_seed(4))
    (tmp_path / "db").mkdir()
    save_file({"t5xxl": vectors, "t5": vectors.clone()}, tmp_path / "db" / "my-thing.safetensors")
    embedding = load_embedding(tmp_path / "db" / "my-thing.safetensors")
    assert embedding.dim == {"t5": 40} and embedding.vector_count == 2
    picture = save_embedding(embedding, tmp_path / "picture" / "my-thing.png")  # the PNG form keeps it too
    assert torch.equal(load_embedding(picture).vectors["t5"], vectors)
    encoder = PromptEncoder.from_pipeline(load_base_model(tiny_flux_path)[0])
    used, plain = encoder.encode(PROMPT, _database(tmp_path / "db", encoder)), encoder.encode(PROMPT)
    assert torch.equal(used.pooled, plain.pooled) and not torch.equal(used.embeds, plain.embeds)


def test_one_encoder_models_take_it_and_sdxl_skips_it(tiny_sd1_path, tiny_sdxl_path, tmp_path):
    """SD1 (CLIP-L, 32 wide in the tiny model) uses it as the same vectors in a bare file; SDXL
    needs both encoders' vectors, so it is skipped with the widths in the reason."""
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    for folder in ("keyed", "bare"):
        (tmp_path / folder).mkdir()
    save_file({"clip_l": vectors}, tmp_path / "keyed" / "my-thing.safetensors")
    save_file({"emb_params": vectors}, tmp_path / "bare" / "my-thing.safetensors")
    encoder = PromptEncoder.from_pipeline(load_base_model(tiny_sd1_path)[0])
    keyed, bare = _database(tmp_path / "keyed", encoder), _database(tmp_path / "bare", encoder)
    assert torch.equal(encoder.encode(PROMPT, keyed).embeds, encoder.encode(PROMPT, bare).embeds)
    assert not torch.equal(encoder.encode(PROMPT, keyed).embeds, encoder.encode(PROMPT).embeds)

    xl = _database(tmp_path / "keyed", PromptEncoder.from_pipeline(load_base_model(tiny_sdxl_path)[0]))
    assert "my-thing" not in xl
    assert list(xl.skipped.values()) == ["my-thing: clip_l 32 does not fit the loaded model (clip_l 32 + clip_g 48): "
                                         "it takes every encoder's vectors or none"]
