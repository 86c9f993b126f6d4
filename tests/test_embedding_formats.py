"""Embedding files: A1111 fixtures read exactly, every writer x every reader, safe `.pt` files,
PNG encodings reproduced bit for bit, one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zlib

import numpy as np
import pytest
import torch
from helpers_embeddings import FIXTURES, A1111Refused, a1111_safe_check, same_bits, sample_embedding
from PIL import Image
from safetensors.torch import load_file, save_file

from tinv_lib.common.errors import FileFormatError, TinvError, UnsafeFileError
from tinv_lib.embeddings import (
    Embedding,
    NotAnEmbeddingError,
    a1111_dict,
    embedding_from_data,
    load_embedding,
    save_embedding,
)
from tinv_lib.embeddings.image_embed import (
    TEXT_CHUNK_KEY,
    caption_overlay,
    extract_data_blocks,
    insert_data_blocks,
    lcg_outputs,
    payload_json,
    text_chunk_value,
)

HASHES = json.loads((FIXTURES / "hashes.json").read_text())["embedding_files"]


def expected(name: str) -> torch.Tensor:
    return load_file(FIXTURES / f"{name}-expected.safetensors")["vec"]


# ------------------------------------------------------------------ A1111 fixtures


@pytest.mark.parametrize(
    "file_name",
    ["emb-2v768-legacy.pt", "emb-2v768-default.pt", "emb-2v768-text-and-pixels.png", "emb-2v768-pixels-only.png"],
)
def test_a1111_2v768_files_read_exactly(file_name):
    embedding = load_embedding(FIXTURES / file_name)
    assert same_bits(embedding.vectors, expected("emb-2v768"))
    assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (1500, "0123456789", "fixture-model")
    assert embedding.checksum() == "4d2f"
    # .pt: named by file stem; images: by the name stored inside (A1111's loader)
    assert embedding.name == ("fixture-emb-2v" if file_name.endswith(".png") else file_name[:-3])
    if file_name in HASHES and "shorthash" in HASHES[file_name]:
        assert embedding.shorthash == HASHES[file_name]["shorthash"]
        assert embedding.name == HASHES[file_name]["a1111_name"]


@pytest.mark.parametrize("file_name", ["emb-1v1024-legacy.pt", "emb-1v1024-default.pt"])
def test_a1111_1v1024_files_read_exactly(file_name):
    embedding = load_embedding(FIXTURES / file_name)
    assert same_bits(embedding.vectors, expected("emb-1v1024"))
    assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (0, None, None)
    assert embedding.checksum() == "daa1"
    assert embedding.sha256 == HASHES[file_name]["sha256"]
    assert embedding.format == "a1111-pt"


def test_png_formats_are_told_apart():
    assert load_embedding(FIXTURES / "emb-2v768-text-and-pixels.png").format == "png-text"
    assert load_embedding(FIXTURES / "emb-2v768-pixels-only.png").format == "png-pixels"


def test_lcg_reference_values():
    outputs = lcg_outputs(100_100)
    assert outputs[:10].tolist() == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79]
    assert int(outputs[100:].sum()) == 12731374  # A1111's self-test
    state, reference = 0, []
    for _ in range(9000):  # the block-composed stream equals the plain recurrence
        state = (1664525 * state + 1013904223) % 2**32
        reference.append(state % 255)
    assert outputs[:9000].tolist() == reference


def test_png_writer_reproduces_a1111_file_bit_for_bit():
    """Same dict, same picture, same caption: our text chunk and every pixel equal A1111's."""
    fixture = Image.open(FIXTURES / "emb-2v768-text-and-pixels.png")
    data = a1111_dict(dataclasses.replace(load_embedding(FIXTURES / "emb-2v768-legacy.pt"), name="fixture-emb-2v"))
    assert len(payload_json(data)) == 33_866
    assert text_chunk_value(data) == fixture.text[TEXT_CHUNK_KEY]
    picture = Image.fromarray(np.random.default_rng(3).integers(40, 216, (4, 4, 3), np.uint8))
    picture = picture.resize((256, 256), Image.Resampling.BICUBIC)
    captioned = caption_overlay(picture, "<fixture-emb-2v>", "fixture-model", "[0123456789]", "2v 1501s")
    ours = insert_data_blocks(captioned, data, data["string_to_param"]["*"][0])
    assert ours.size == (300, 256)
    assert np.array_equal(np.asarray(ours), np.asarray(fixture.convert("RGB")))


def test_pixel_payload_of_fixture_is_the_zlib_json():
    data = extract_data_blocks(Image.open(FIXTURES / "emb-2v768-pixels-only.png"))
    assert data["name"] == "fixture-emb-2v" and data["step"] == 1500
    assert data["string_to_param"]["*"].dtype == torch.float64  # as A1111's decoder returns it
    assert len(zlib.compress(payload_json(data), 9)) == 15_251


# ------------------------------------------------------------------ round-trip matrix

WRITERS = {
    "pt": lambda emb, folder: save_embedding(emb, folder / f"{emb.name}.pt"),
    "safetensors": lambda emb, folder: save_embedding(emb, folder / f"{emb.name}.safetensors"),
    "safetensors-diffusers": lambda emb, folder: save_embedding(
        emb, folder / f"{emb.name}.safetensors", layout="diffusers"
    ),
    "bin": lambda emb, folder: save_embedding(emb, folder / f"{emb.name}.bin"),
    "png": lambda emb, folder: save_embedding(emb, folder / f"{emb.name}.png"),
    "png-pixels-only": lambda emb, folder: _strip_text_chunks(save_embedding(emb, folder / f"{emb.name}.png")),
}


def _strip_text_chunks(path):
    """Rewrite a PNG with the same pixels and no text chunk (what many image tools do)."""
    image = Image.open(path)
    image.convert("RGB").save(path, format="PNG")
    assert not getattr(Image.open(path), "text", {})
    return path


def carries_metadata(kind: str, writer: str) -> bool:
    """Formats with room for step/checkpoint: A1111 .pt (SD1/2), safetensors, PNG (SDXL: text)."""
    if writer.startswith("safetensors"):
        return True
    if kind == "sdxl":
        return writer == "png"
    return writer in ("pt", "png", "png-pixels-only")


def _read_back(writer, embedding, folder):
    path = WRITERS[writer](embedding, folder)
    loaded = load_embedding(path)
    assert loaded.name == embedding.name
    assert same_bits(loaded.vectors, embedding.vectors), writer
    return loaded


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("first", list(WRITERS))
def test_every_writer_with_every_reader(kind, first, tmp_path):
    """Write with one format, read, write that with every format, read: vectors bit-identical,
    metadata kept wherever both formats carry it."""
    original = sample_embedding("emb", kind, vectors=2, seed=len(first))
    step_one = _read_back(first, original, tmp_path / "one")
    for second in WRITERS:
        step_two = _read_back(second, dataclasses.replace(step_one, name="emb2"), tmp_path / "two" / second)
        for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
            if carries_metadata(kind, first) and carries_metadata(kind, second):
                assert getattr(step_two, key) == getattr(original, key), (first, second, key)
        assert step_two.checksum() == original.checksum()


def test_written_files_have_the_documented_layouts(tmp_path):
    sd1, sdxl = sample_embedding("cat-toy", "sd1"), sample_embedding("xl", "sdxl")
    raw = torch.load(save_embedding(sd1, tmp_path / "cat-toy.pt"), weights_only=True)
    assert list(raw) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"]
    assert raw["string_to_token"] == {"*": 265} and raw["name"] == "cat-toy" and type(raw["step"]) is int
    assert raw["string_to_param"]["*"].dtype == torch.float32
    assert list(load_file(save_embedding(sd1, tmp_path / "a.safetensors"))) == ["emb_params"]
    assert list(load_file(save_embedding(sd1, tmp_path / "b.safetensors", layout="diffusers"))) == ["cat-toy"]
    assert list(torch.load(save_embedding(sd1, tmp_path / "c.bin"), weights_only=True)) == ["cat-toy"]
    assert sorted(load_file(save_embedding(sdxl, tmp_path / "xl.safetensors"))) == ["clip_g", "clip_l"]
    assert sorted(torch.load(save_embedding(sdxl, tmp_path / "xl.pt"), weights_only=True)) == ["clip_g", "clip_l"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as handle:
        assert handle.metadata()["step"] == "1234" and handle.metadata()["format"] == "pt"


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_every_pt_we_write_passes_weights_only_and_the_a1111_check(kind, tmp_path):
    embedding = sample_embedding("safe", kind)
    embedding.vectors = (
        {k: torch.nn.Parameter(v) for k, v in embedding.vectors.items()}
        if isinstance(embedding.vectors, dict)
        else torch.nn.Parameter(embedding.vectors)  # as it sits in a trainer
    )
    for suffix in (".pt", ".bin"):
        path = save_embedding(embedding, tmp_path / f"safe{suffix}")
        torch.load(path, weights_only=True)
        a1111_safe_check(path)
        assert same_bits(load_embedding(path).vectors, sample_embedding("safe", kind).vectors)


def test_a1111_check_mirror_refuses_what_a1111_refuses(tmp_path):
    """The mirror is honest: A1111's default-serialized fixture and a code-running pickle fail."""
    with pytest.raises(A1111Refused, match=r"\.format_version"):
        a1111_safe_check(FIXTURES / "emb-2v768-default.pt")
    a1111_safe_check(FIXTURES / "emb-2v768-legacy.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "zip.pt")
    with pytest.raises(A1111Refused):
        a1111_safe_check(tmp_path / "zip.pt")


def test_old_parameterdict_embedding(tmp_path):
    """rinongal-era files pickle a torch.nn.ParameterDict as string_to_param."""
    vec = torch.randn(2, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old"}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    embedding = load_embedding(tmp_path / "old.pt")
    assert embedding.format == "a1111-parameterdict-pt" and same_bits(embedding.vectors, vec)


def test_single_key_variants(tmp_path):
    vec = torch.randn(768)
    torch.save({"<concept>": vec}, tmp_path / "concept.bin")  # old HF concepts: 1-D
    embedding = load_embedding(tmp_path / "concept.bin")
    assert embedding.vectors.shape == (1, 768) and embedding.format == "diffusers-bin"
    save_file({"emb_params": torch.randn(4, 1024).half()}, tmp_path / "kohya.safetensors")
    embedding = load_embedding(tmp_path / "kohya.safetensors")
    assert embedding.vectors.dtype == torch.float32 and embedding.vector_count == 4
    assert embedding.format == "emb_params-safetensors" and embedding.name == "kohya"


# ------------------------------------------------------------------ bad input


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize(
    ("file_name", "content", "error"),
    [
        ("notes.txt", b"hello", "unknown embedding file type"),
        ("trunc.pt", b"\x80\x02garbage", "not a readable PyTorch file"),
        ("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a readable safetensors file"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, file_name, content, error):
    (tmp_path / file_name).write_bytes(content)
    with pytest.raises(FileFormatError, match=error) as caught:
        load_embedding(tmp_path / file_name)
    assert "\n" not in str(caught.value)


def test_malicious_pickle_is_refused_before_running(tmp_path):
    torch.save({"string_to_param": {"*": _RunsCode()}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="forbidden"):
        load_embedding(tmp_path / "evil.pt")


def test_wrong_shapes_and_contents(tmp_path):
    with pytest.raises(FileFormatError, match="multiple terms"):
        embedding_from_data({"string_to_param": {"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}}, "x")
    with pytest.raises(FileFormatError, match="one"):
        embedding_from_data({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, "x")
    with pytest.raises(FileFormatError, match="neither"):
        embedding_from_data({"state_dict": {}}, "x")
    with pytest.raises(FileFormatError, match="NaN"):
        embedding_from_data({"emb_params": torch.tensor([[float("nan")]])}, "x")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match="not an embedding"):
        load_embedding(tmp_path / "list.pt")


def test_plain_and_preview_pictures_are_not_embeddings(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "photo.png")
    with pytest.raises(NotAnEmbeddingError, match="no embedding"):
        load_embedding(tmp_path / "photo.png")
    save_embedding(sample_embedding("x"), tmp_path / "x.preview.png")
    with pytest.raises(NotAnEmbeddingError, match="preview"):
        load_embedding(tmp_path / "x.preview.png")


def test_damaged_text_chunk_falls_back_to_pixels(tmp_path):
    from PIL import PngImagePlugin

    path = save_embedding(sample_embedding("x"), tmp_path / "x.png")
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, "!!not base64 json!!")
    Image.open(path).convert("RGB").save(path, pnginfo=info)
    embedding = load_embedding(path)
    assert embedding.format == "png-pixels" and same_bits(embedding.vectors, sample_embedding("x").vectors)


def test_lossless_webp_carries_the_pixel_blocks(tmp_path):
    """WebP has no text chunks; A1111 reads such files from their pixels alone."""
    Image.open(FIXTURES / "emb-2v768-text-and-pixels.png").save(tmp_path / "x.webp", lossless=True)
    embedding = load_embedding(tmp_path / "x.webp")
    assert embedding.format == "webp-pixels" and embedding.name == "fixture-emb-2v"
    assert same_bits(embedding.vectors, expected("emb-2v768"))


def test_unsupported_target_and_bad_vectors(tmp_path):
    with pytest.raises(TinvError, match="cannot write"):
        save_embedding(sample_embedding("x"), tmp_path / "x.ckpt")
    with pytest.raises(TinvError, match=r"for clip_l: not a known form \(clip_l \+ clip_g, "):
        save_embedding(Embedding("x", {"clip_l": torch.zeros(1, 4)}), tmp_path / "x.safetensors")


def test_pickle_protocol_of_pt_is_legacy(tmp_path):
    path = save_embedding(sample_embedding("x"), tmp_path / "x.pt")
    with open(path, "rb") as handle:  # legacy format starts with the pickled magic number
        assert pickle.Unpickler(handle).load() == 0x1950A86A20F9469CFC6C
