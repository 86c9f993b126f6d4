"""Base-model loading: diffusers folders, single files with a local config folder, hashes."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.models.architecture import SD1, SDXL, of_checkpoint_keys
from tinv_lib.models.hashes import old_model_hash, sha256_file, short_hash
from tinv_lib.models.loading import (
    load_base_model,
    read_checkpoint,
    save_model_config,
    write_single_file,
)

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _assert_same_weights(a, b):
    for name in COMPONENTS:
        if getattr(a, name, None) is None:
            assert getattr(b, name, None) is None
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def model_and_config(request, tmp_path_factory):
    folder = request.getfixturevalue({"sd1": "tiny_sd1_path", "sd2": "tiny_sd2_path", "sdxl": "tiny_sdxl_path"}[request.param])
    config = save_model_config(folder, tmp_path_factory.mktemp("config") / request.param)
    return request.param, folder, config


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip_is_bit_identical(model_and_config, suffix, tmp_path):
    arch, folder, config = model_and_config
    pipe, info = load_base_model(folder)
    assert info.arch == arch
    single = write_single_file(pipe, tmp_path / f"model{suffix}")
    assert not any(p.suffix in (".safetensors", ".bin") for p in config.rglob("*")), "config folder has no weights"
    loaded, loaded_info = load_base_model(single, model_config=config)
    assert loaded_info.arch == arch
    expected_prediction = "v_prediction" if arch == "sd2" else "epsilon"
    assert loaded_info.prediction_type == loaded.scheduler.config.prediction_type == expected_prediction
    _assert_same_weights(pipe, loaded)
    assert type(loaded).__name__ == type(pipe).__name__


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_our_single_file_reads_the_same_in_diffusers_from_single_file(arch, request, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(f"tiny_{arch}_path")
    pipe, _ = load_base_model(folder)
    single = write_single_file(pipe, tmp_path / "model.safetensors")
    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    theirs = pipeline_class.from_single_file(str(single), config=str(folder), local_files_only=True)
    _assert_same_weights(pipe, theirs)


def test_original_layout_key_names(tiny_sd1_path, tiny_sdxl_path, tmp_path):
    sd1, _ = load_base_model(tiny_sd1_path)
    keys = set(read_checkpoint(write_single_file(sd1, tmp_path / "a.safetensors"))[0])
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in keys, key
    xl, _ = load_base_model(tiny_sdxl_path)
    xl_keys = set(read_checkpoint(write_single_file(xl, tmp_path / "b.safetensors"))[0])
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in xl_keys
    assert "conditioner.embedders.1.model.text_projection" in xl_keys
    assert "model.diffusion_model.label_emb.0.0.weight" in xl_keys
    assert of_checkpoint_keys(xl_keys) is SDXL and of_checkpoint_keys(keys) is SD1


def test_architecture_is_detected_alike_from_pipeline_folder_and_single_file(model_and_config, tmp_path):
    from tinv_lib.models import architecture
    from tinv_lib.models.family import family_of

    arch, folder, config = model_and_config
    pipe, _ = load_base_model(folder)
    keys = read_checkpoint(write_single_file(pipe, tmp_path / "model.safetensors"))[0]
    found = {
        "pipeline": architecture.of_pipeline(pipe),
        "folder": architecture.of_folder(folder),
        "config folder": architecture.of_folder(config),
        "single-file keys": architecture.of_checkpoint_keys(keys),
    }
    assert {where: a.name for where, a in found.items()} == dict.fromkeys(found, arch)
    assert family_of(pipe).architecture is architecture.ARCHITECTURES[arch]


def test_single_file_errors_are_one_line(tiny_sd1_path, tiny_sdxl_path, tmp_path):
    pipe, _ = load_base_model(tiny_sd1_path)
    single = write_single_file(pipe, tmp_path / "m.safetensors")
    with pytest.raises(TinvError, match="needs --model_config"):
        load_base_model(single)
    with pytest.raises(TinvError, match="weights are SD1 but .* SDXL config"):
        load_base_model(single, model_config=tiny_sdxl_path)
    with pytest.raises(TinvError, match="no such model"):
        load_base_model(tmp_path / "nothing-here")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(TinvError, match="junk.safetensors"):
        load_base_model(junk, model_config=tiny_sd1_path)


def test_a1111_model_hashes_of_fixture_checkpoints(tmp_path):
    expected = json.loads((FIXTURES / "hashes.json").read_text())["checkpoints"]
    big = tmp_path / "dummy-checkpoint-1200000.safetensors"
    big.write_bytes(gzip.decompress((FIXTURES / "dummy-checkpoint-1200000.safetensors.gz").read_bytes()))
    small = tmp_path / "dummy-checkpoint-small.safetensors"
    shutil.copy(FIXTURES / "dummy-checkpoint-small.safetensors", small)
    for path in (small, big):
        facts = expected[path.name]
        assert sha256_file(path) == facts["sha256"]
        assert short_hash(path) == facts["shorthash"]
        assert old_model_hash(path) == facts["model_hash"]


def test_folder_hash_follows_the_documented_manifest_rule(tiny_sd1_path, tmp_path):
    import hashlib

    weights = sorted(p for p in tiny_sd1_path.rglob("*") if p.suffix in (".safetensors", ".bin"))
    manifest = "".join(f"{p.relative_to(tiny_sd1_path).as_posix()} {sha256_file(p)}\n" for p in weights)
    assert sha256_file(tiny_sd1_path) == hashlib.sha256(manifest.encode()).hexdigest()
    _, info = load_base_model(tiny_sd1_path)
    assert info.short_hash == sha256_file(tiny_sd1_path)[:10]
    assert info.old_hash == old_model_hash(tiny_sd1_path / "unet" / "diffusion_pytorch_model.safetensors")


def test_the_model_hash_is_computed_while_the_model_loads(tiny_sd1_path, tmp_path, monkeypatch):
    """The hash starts on its own thread before loading and gives the same value as hashing after."""
    import tinv_lib.models.loading as loading

    monkeypatch.setenv("TINV_CACHE_DIR", str(tmp_path / "cache"))  # a cold hash cache
    single = write_single_file(load_base_model(tiny_sd1_path)[0], tmp_path / "m.safetensors")
    order, real_hash, real_load = [], loading.BackgroundHash.__init__, loading._load_single_file

    def start_hash(self, path):
        order.append("hash")
        real_hash(self, path)

    def load(*args, **kwargs):
        order.append("load")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loading.BackgroundHash, "__init__", start_hash)
    monkeypatch.setattr(loading, "_load_single_file", load)
    _, info = load_base_model(single, tiny_sd1_path)
    assert order == ["hash", "load"] and isinstance(info.hashing, loading.BackgroundHash)
    assert info.sha256 == sha256_file(single, use_cache=False)
