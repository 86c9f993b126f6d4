"""Safe loading of pickle-based files: legitimate files load, code in a pickle never runs."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from tinv_lib.common.errors import UnsafeFileError
from tinv_lib.common.torch_files import safe_torch_load, save_a1111_pt

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_a_command_is_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"string_to_param": {"*": torch.zeros(1, 4)}, "x": _Exploit(marker)}
    torch.save(payload, evil, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeFileError) as caught:
        safe_torch_load(evil)
    message = str(caught.value)
    assert "evil.pt" in message and "\n" not in message and "forbidden" in message
    assert not marker.exists()


def test_plain_pickle_with_exploit_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(Exception, match="evil.bin"):
        safe_torch_load(evil)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["emb-2v768-legacy.pt", "emb-2v768-default.pt"])
def test_a1111_embedding_files_load(name):
    data = safe_torch_load(FIXTURES / name)
    vec = data["string_to_param"]["*"]
    assert vec.shape == (2, 768) and vec.dtype == torch.float32
    assert data["name"] == "fixture-emb-2v" and data["step"] == 1500


def test_old_parameterdict_embedding_loads(tmp_path):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(3, 8))})
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old", "step": 7}, path,
               _use_new_zipfile_serialization=False)
    data = safe_torch_load(path)
    inner = data["string_to_param"]._parameters
    assert torch.equal(inner["*"], params["*"].data)


def test_checkpoint_with_numpy_step_and_optimizer_state_loads(tmp_path):
    import numpy as np

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": np.int64(5), "optimizer_states": [optimizer.state_dict()]}, path)
    data = safe_torch_load(path)
    assert int(data["global_step"]) == 5
    assert torch.equal(data["state_dict"]["weight"], model.weight.data)
    assert data["optimizer_states"][0]["state"][0]["exp_avg"].shape == (2, 4)


def test_bitsandbytes_8bit_optimizer_state_loads_and_resumes(tmp_path):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = bnb.optim.AdamW8bit([param], min_8bit_size=16)
    for _ in range(2):
        param.sum().backward()
        optimizer.step()
    path = tmp_path / "x.optim"
    save_a1111_pt({"optimizer_state_dict": optimizer.state_dict()}, path)
    restored_param = torch.nn.Parameter(param.detach().clone())
    restored = bnb.optim.AdamW8bit([restored_param], min_8bit_size=16)
    restored.load_state_dict(safe_torch_load(path)["optimizer_state_dict"])
    for p, opt in ((param, optimizer), (restored_param, restored)):
        p.grad = None
        p.sum().backward()
        opt.step()
    assert torch.equal(param, restored_param)


def test_saved_files_are_legacy_format_and_weights_only_loadable(tmp_path):
    path = tmp_path / "e.pt"
    save_a1111_pt({"string_to_param": {"*": torch.ones(1, 4)}, "name": "e", "step": 0, "sd_checkpoint": None}, path)
    import zipfile

    assert not zipfile.is_zipfile(path)
    assert torch.load(path, weights_only=True)["name"] == "e"
    assert [p.name for p in tmp_path.iterdir()] == ["e.pt"], "no temporary file left behind"


def test_corrupt_file_gives_one_line_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(Exception) as caught:
        safe_torch_load(path)
    assert "broken.pt" in str(caught.value) and "\n" not in str(caught.value)
