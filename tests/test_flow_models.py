"""FLUX.1 and SD3 folders are recognised and loaded as their architectures; their single files
are recognised too (issue 33)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tinv_lib.models import architecture
from tinv_lib.models.architecture import FLUX, SD3, ModelLoadError
from tinv_lib.models.family import family_of
from tinv_lib.models.loading import load_base_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_folders_and_pipelines_are_detected_by_their_pipeline_class(tiny_flux_path, tiny_sd3_path, tiny_sdxl_path):
    assert architecture.of_folder(tiny_flux_path) is FLUX
    assert architecture.of_folder(tiny_sd3_path) is SD3
    assert architecture.of_folder(tiny_sdxl_path).name == "sdxl"  # also has text_encoder_2: unchanged
    for path, arch, widths in ((tiny_flux_path, FLUX, {"clip_l": 32, "t5": 40}),
                               (tiny_sd3_path, SD3, {"clip_l": 32, "clip_g": 48, "t5": 96})):
        pipe, info = load_base_model(path)
        assert type(pipe).__name__ == arch.pipeline_class_name and info.arch == arch.name
        family = family_of(pipe)
        assert family.architecture is arch and arch.flow_matching
        assert arch.embedding_dim(family.widths) == widths
        assert type(family.tokenizers[-1]).__name__.startswith("T5Tokenizer")


@pytest.mark.parametrize("key, arch", [("double_blocks.0.img_attn.qkv.weight", FLUX),
                                       ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", FLUX),
                                       ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", SD3)])
def test_single_files_are_detected_and_need_a_config_folder(key, arch, tmp_path):
    """BFL's and SAI's layouts, bare or under ComfyUI's prefix (loading them:
    tests/test_flow_single_files.py)."""
    assert architecture.of_checkpoint_keys([key]) is arch
    save_file({key: torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_base_model(tmp_path / "model.safetensors")
    assert f"a single-file {arch.label} checkpoint needs --model_config DIR" in str(caught.value)
    assert "\n" not in str(caught.value)
