"""Loading base models: diffusers folders, single-file checkpoints, hub ids; architecture and hashes.

Users of A1111 hold single `.safetensors`/`.ckpt` files in the original key layout; diffusers
users hold folders. Both load here into a diffusers pipeline plus a `ModelInfo` that says which
architecture it is (detected from the weights, never from a `--v2` flag) and carries the A1111
hashes recorded in every file we write.

A single file is read fully offline: its component configs and tokenizers come from a local
config folder (`--model_config`: any diffusers folder of the same architecture, weights
optional), never from the hub, which is what `from_single_file` would otherwise try.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from tinv_lib.models import checkpoint_layout as layout
from tinv_lib.models.architecture import (
    Architecture,
    ModelLoadError,
    of_checkpoint_keys,
    of_folder,
    of_pipeline,
    read_json,
)
from tinv_lib.models.hashes import model_name, old_model_hash, sha256_file

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass
class ModelInfo:
    """What kind of model was loaded, and its identity as A1111 records it."""

    arch: str  # "sd1" | "sd2" | "sdxl": the name of an `Architecture`
    prediction_type: str  # "epsilon" | "v_prediction"
    path: Path
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = model_name(self.path) if self.path.exists() else str(self.path).replace("/", "_")

    hashing: BackgroundHash | None = field(default=None, repr=False, compare=False)

    @cached_property
    def sha256(self) -> str:
        """Full sha256 (for a folder: of its weight-file manifest, see `tinv_lib.models.hashes`)."""
        if self.hashing is not None:
            return self.hashing.result()
        return sha256_file(self.path) if self.path.exists() else ""

    @property
    def short_hash(self) -> str:
        """A1111 `Model hash` / `sd_checkpoint`: sha256[:10]."""
        return self.sha256[:10]

    @cached_property
    def old_hash(self) -> str:
        """A1111's pre-2023 8-hex model hash."""
        return old_model_hash(self.path) if self.path.exists() else "NOFILE"


class BackgroundHash:
    """The model's sha256, computed on a daemon thread while the model loads.

    Hashing a 4 GB checkpoint reads every byte once (about 10-20 s), and loading reads them again;
    hashlib and file reads release the GIL, so the two overlap instead of adding up. The hash is
    cached by path, size and mtime (`hashes.sha256_file`), so later runs pay nothing. A daemon
    thread, so a model that fails to load does not keep the process alive until the hash ends."""

    def __init__(self, path: Path):
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="tinv-model-hash", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._value = sha256_file(path)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = error

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# ------------------------------------------------------------------------------- detection


def _probe_v_prediction(unet) -> bool:
    """A1111's test for SD2 checkpoints without a marker: at t=999 on a constant input, a
    v-prediction UNet's output minus the input has a mean below -1; an eps UNet's does not.
    Meaningful for trained SD2 weights only."""
    width = unet.config.cross_attention_dim
    with torch.no_grad():
        x = torch.full((1, 4, 8, 8), 0.5, dtype=unet.dtype)
        context = torch.full((1, 2, width), 0.5, dtype=unet.dtype)
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    return (out - x).float().mean().item() < -1


def _marked_prediction(state: dict, metadata: dict) -> str | None:
    """Explicit markers: ComfyUI's `v_pred` key, SAI ModelSpec `modelspec.prediction_type`."""
    if "v_pred" in state:
        return "v_prediction"
    marked = (metadata or {}).get("modelspec.prediction_type", "")
    if marked:
        return "v_prediction" if marked.startswith("v") else "epsilon"
    return None


# ---------------------------------------------------------------------------------- loading


def load_base_model(
    path: str | os.PathLike, model_config: str | os.PathLike | None = None, dtype: torch.dtype | None = None
):
    """Load `path` (diffusers folder, single file, or hub id when online) as a pipeline.

    Returns `(pipeline, ModelInfo)`. The pipeline is a `StableDiffusionPipeline` or
    `StableDiffusionXLPipeline` on the CPU; safety checkers are never loaded.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown model file type (expected {', '.join(SINGLE_FILE_SUFFIXES)})")
    if path.exists():
        hashing = BackgroundHash(path)
        pipe, info = _load_folder(path, dtype) if path.is_dir() else _load_single_file(path, model_config, dtype)
        info.hashing = hashing
        return pipe, info
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        return _load_hub(str(path), dtype)
    raise ModelLoadError(f"{path}: no such model folder or file")


def _load_folder(folder: Path, dtype: torch.dtype | None):
    arch = of_folder(folder)
    try:
        pipe = arch.pipeline_class().from_pretrained(folder, torch_dtype=dtype, **arch.pipeline_kwargs())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}: cannot load diffusers model ({str(error).splitlines()[0]})") from None
    pipe.set_progress_bar_config(disable=True)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    return pipe, ModelInfo(arch.name, prediction, folder)


def _load_hub(repo_id: str, dtype: torch.dtype | None):
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(repo_id)
    except Exception as error:  # noqa: BLE001 - hub errors have many types; one line for the user
        raise ModelLoadError(
            f"{repo_id}: not a local path, and the hub cannot be reached ({type(error).__name__}); "
            "pass a local diffusers folder or a single-file checkpoint with --model_config"
        ) from None
    return _load_folder(Path(folder), dtype)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and safetensors metadata of a single-file checkpoint (`.ckpt` via safe loading)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({error})") from None
    from tinv_lib.common.torch_files import safe_torch_load

    data = safe_torch_load(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a checkpoint (no state dict inside)")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def _load_single_file(path: Path, model_config: str | os.PathLike | None, dtype: torch.dtype | None):
    state, metadata = read_checkpoint(path)
    arch = of_checkpoint_keys(state)
    if model_config is None:
        raise ModelLoadError(
            f"{path}: a single-file {arch.label} checkpoint needs --model_config DIR "
            "(a diffusers folder of the same architecture; its configs and tokenizers are read, "
            "and the weights of any part the file lacks)"
        )
    config_dir = Path(model_config)
    config_arch = of_folder(config_dir)
    if config_arch != arch:
        raise ModelLoadError(f"{path}: the weights are {arch.label} but {config_dir} is a {config_arch.label} config")
    if arch.flow_matching:
        return _load_flow_single_file(path, state, arch, config_dir, dtype)
    components = _empty_components(config_dir, arch)
    for name, rules in _component_rules(components, arch).items():
        converted = layout.from_original(rules, state, f"{path} ({name})")
        try:
            components[name].load_state_dict(converted, strict=True, assign=True)
        except RuntimeError as error:
            raise ModelLoadError(f"{path} ({name}): does not fit {config_dir}: {str(error).splitlines()[0]}") from None
    prediction = _marked_prediction(state, metadata)
    if prediction is None:
        prediction = "v_prediction" if arch.probe_v_prediction and _probe_v_prediction(components["unet"]) else "epsilon"
    scheduler_class = type(components["scheduler"])
    components["scheduler"] = scheduler_class.from_config(components["scheduler"].config, prediction_type=prediction)
    pipe = arch.pipeline_class()(**components, **arch.pipeline_kwargs())
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ModelInfo(arch.name, prediction, path)


def _empty_components(config_dir: Path, arch: Architecture) -> dict:
    """Models built from configs without allocating random weights; tokenizers and scheduler."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTokenizer

    def config(sub: str) -> dict:
        return read_json(config_dir / sub / "config.json")

    with init_empty_weights():
        components = {
            "unet": diffusers.UNet2DConditionModel.from_config(config("unet")),
            "vae": diffusers.AutoencoderKL.from_config(config("vae")),
        }
        for slot in arch.encoders:
            text_config = CLIPTextConfig.from_pretrained(config_dir / slot.text_encoder)
            components[slot.text_encoder] = slot.model_class()(text_config)
    for slot in arch.encoders:
        components[slot.tokenizer] = CLIPTokenizer.from_pretrained(config_dir / slot.tokenizer)
    scheduler_config = read_json(config_dir / "scheduler" / "scheduler_config.json")
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"))
    components["scheduler"] = scheduler_class.from_config(scheduler_config)
    return components


def _component_rules(components: dict, arch: Architecture) -> dict[str, list[layout.KeyRule]]:
    """Key rules for every weighted component of a pipeline of architecture `arch`."""
    unet, vae = components["unet"], components["vae"]
    rules = {
        "unet": layout.unet_rules(list(unet.state_dict()), unet.config),
        "vae": layout.vae_rules(list(vae.state_dict()), vae.config),
    }
    for slot in arch.encoders:
        text_rules = layout.open_clip_rules if slot.open_clip else layout.hf_clip_rules
        rules[slot.text_encoder] = text_rules(list(components[slot.text_encoder].state_dict()), slot.checkpoint_prefix)
    return rules


def _load_flow_single_file(path: Path, state: dict, arch: Architecture, config_dir: Path, dtype: torch.dtype | None):
    """A FLUX.1 or SD3 single file: each model the file holds is read from it, in any of the
    layouts real files have (BFL's transformer-only `flux1-dev.safetensors`, ComfyUI's and SAI's
    all-in-one files with `vae.`/`first_stage_model.` and `text_encoders.*`); each model it lacks
    comes from the weights in `config_dir`, as diffusers users pass those components to
    `from_single_file`. Tokenizers and the scheduler come from `config_dir`."""
    import importlib

    components = {}
    for name, entry in read_json(config_dir / "model_index.json").items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        if issubclass(cls, torch.nn.Module):
            components[name] = _flow_model(path, state, arch, config_dir / name, cls, dtype)
        else:
            components[name] = cls.from_pretrained(config_dir / name)
    pipe = arch.pipeline_class()(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ModelInfo(arch.name, pipe.scheduler.config.get("prediction_type", "epsilon"), path)


def _flow_model(path: Path, state: dict, arch: Architecture, folder: Path, cls,
                dtype: torch.dtype | None) -> torch.nn.Module:
    """One model of a FLUX.1/SD3 pipeline: converted from the file, or the folder's when the file
    has none of its tensors. In `dtype`, else float32 as from a folder (not the file's own, often
    bf16)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(cls, "config_class"):  # transformers
            model = cls(cls.config_class.from_pretrained(folder))
        else:
            model = cls.from_config(cls.load_config(folder))
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    where = f"{path} ({folder.name})"
    rules = _flow_rules(folder.name, model.config, shapes, arch, state, where)
    if not rules:
        return _model_from_folder(path, folder, cls, arch, dtype)
    try:
        converted = layout.from_original(rules, state, where)
    except (KeyError, ValueError) as error:  # the message names the file, the part and a tensor
        raise ModelLoadError(str(error.args[0])) from None
    slot = next((slot for slot in arch.encoders if slot.text_encoder == folder.name), None)
    if slot is not None and slot.identity_projection_in_files:
        converted["text_projection.weight"] = torch.eye(*shapes["text_projection.weight"])
    converted = {key: value.to(dtype or torch.float32) if value.is_floating_point() else value
                 for key, value in converted.items()}
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as error:  # "Error(s) in loading state_dict for X:", then one line per error
        detail = [line.strip() for line in str(error).splitlines() if line.strip()][1:2] or [str(error)]
        raise ModelLoadError(f"{where}: does not fit {folder}: {detail[0]}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5's input embedding is its `shared` matrix, stored once
    return model.eval()


def _flow_rules(name: str, config, shapes: dict, arch: Architecture, state: dict, where: str) -> list[layout.KeyRule]:
    """Key rules for the FLUX.1/SD3 model `name` in the layout the file uses; [] when the file
    holds none of its tensors. The transformer's keys must all be used (a FLUX.1-dev file read
    with a schnell config would otherwise lose its guidance embedding)."""
    if name == "transformer":
        prefix = layout.UNET_PREFIX if any(key.startswith(layout.UNET_PREFIX) for key in state) else ""
        rules = (layout.flux_rules if arch.flow_model == "flux" else layout.sd3_rules)(shapes, prefix)
        _refuse_unused(rules, state, prefix, arch, where)
        return rules
    if name == "vae":
        prefix = next((p for p in layout.VAE_PREFIXES if any(key.startswith(p + "decoder.") for key in state)), None)
        return layout.vae_rules(list(shapes), config, prefix) if prefix else []
    slot = next(slot for slot in arch.encoders if slot.text_encoder == name)
    if not any(key.startswith(slot.checkpoint_prefix) for key in state):
        return []
    if slot.is_t5:
        return layout.t5_rules(list(shapes), slot.checkpoint_prefix)
    keys = [key for key in shapes if not (slot.identity_projection_in_files and key == "text_projection.weight")]
    return layout.hf_clip_rules(keys, slot.checkpoint_prefix)


def _refuse_unused(rules: list[layout.KeyRule], state: dict, prefix: str, arch: Architecture, where: str) -> None:
    """Transformer tensors of the file that the config's transformer has no place for."""
    others = (*layout.VAE_PREFIXES, *(slot.checkpoint_prefix.split(".")[0] + "." for slot in arch.encoders))
    used = {rule.original for rule in rules}
    unused = [key for key in state if key.startswith(prefix) and key not in used and not key.startswith(others)]
    if unused:
        raise ModelLoadError(f"{where}: {len(unused)} tensors have no place in the --model_config transformer, "
                             f"e.g. {unused[0]!r} (is it the same model? FLUX.1-dev and schnell differ)")


def _model_from_folder(path: Path, folder: Path, cls, arch: Architecture, dtype: torch.dtype | None) -> torch.nn.Module:
    """A model the single file lacks, from the config folder's weights (one line if it has none)."""
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError):
        raise ModelLoadError(
            f"{path} holds no {folder.name} weights and {folder} has none either: pass --model_config a "
            f"{arch.pipeline_class_name} folder with {folder.name} weights (only the parts the file lacks are read)"
        ) from None


# ---------------------------------------------------------------------------------- writing


def write_single_file(pipe, path: str | os.PathLike) -> Path:
    """Write a pipeline as an A1111/original-layout single file (`.safetensors` or `.ckpt`).

    A v-prediction SD2 model gets ComfyUI's `v_pred` marker key so it is detected as such.
    """
    from tinv_lib.common.atomic import atomic_path

    path = Path(path)
    arch = of_pipeline(pipe)
    if arch.flow_matching:
        raise ModelLoadError(f"writing {arch.label} single files is not supported; save the diffusers folder")
    names = ["unet", "vae", *(slot.text_encoder for slot in arch.encoders)]
    components = {name: getattr(pipe, name) for name in names}
    original: dict[str, torch.Tensor] = {}
    for name, rules in _component_rules(components, arch).items():
        state = {k: v.detach().cpu().contiguous() for k, v in components[name].state_dict().items()}
        original.update(layout.to_original(rules, state))
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        original["v_pred"] = torch.zeros(0)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(original, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"state_dict": original, "global_step": 0}, tmp)
    return path


def save_model_config(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy a diffusers folder's configs and tokenizers (no weights) to `out`: a `--model_config`."""
    import shutil

    folder, out = Path(folder), Path(out)
    for file in folder.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".txt", ".model"):
            target = out / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    return out

