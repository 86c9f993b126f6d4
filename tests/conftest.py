"""Shared pytest set-up: offline, deterministic, CPU only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _saved_tiny(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    from tinv_lib.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(arch, tmp_path_factory.mktemp(f"tiny-{arch}") / "model")


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1 diffusers folder, built once per test session (seed 0)."""
    return _saved_tiny(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD2 v-prediction diffusers folder (seed 0)."""
    return _saved_tiny(tmp_path_factory, "sd2-v")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers folder (seed 0)."""
    return _saved_tiny(tmp_path_factory, "sdxl")
