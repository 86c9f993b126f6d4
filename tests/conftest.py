"""Shared pytest set-up: offline, deterministic, CPU only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine spinning
# threads slow every test down; subprocesses started by tests inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _saved_tiny(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    """Built as quietly as the trainers run: without this, the libraries' install advice and a
    "Writing model shards" bar land in the output of whichever test builds the model first."""
    from testing.tiny import save_tiny_pipeline
    from tinv_lib.common.quiet import quiet_transformers_loading, silence_known_noise

    silence_known_noise()
    with quiet_transformers_loading():
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


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev diffusers folder (guidance embedding, dynamic shift; seed 0)."""
    return _saved_tiny(tmp_path_factory, "flux-dev")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 diffusers folder (clip_l, clip_g, t5; seed 0)."""
    return _saved_tiny(tmp_path_factory, "sd3")


@pytest.fixture(scope="session")
def training_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 64x64 training images: two captioned by `.txt` sidecars (comma tags), two by name."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("train-data")
    drawings = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square")]
    for index, (colour, shape) in enumerate(drawings):
        image = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(image)
        box = [12 + 4 * index, 14, 50, 50 - 2 * index]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        stem = f"{index:05d}-0-a {colour} {shape}"
        image.save(folder / f"{stem}.png")
        if index < 2:
            (folder / f"{stem}.txt").write_text(f"{colour}, {shape}, white background", encoding="utf-8")
    return folder


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_folder(tmp_path_factory: pytest.TempPathFactory):
    """Subprocesses the tests start put their temporary files inside this session's folder, which
    pytest removes (torchrun's `torchelastic_*` log folders would otherwise pile up in /tmp, one
    per multi-process run). The tests' own process keeps its temporary folder."""
    folder = tmp_path_factory.mktemp("subprocess-tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        yield folder


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in the files that want it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
