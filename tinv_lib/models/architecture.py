"""What SD1, SD2 and SDXL are made of, and how to tell them apart: the one place that knows.

Every difference between the three generations that some module has to act on is a field of
`Architecture`: which text encoders there are (pipeline attributes, their keys in embedding
files, where their weights live in single-file checkpoints and in which CLIP layout), how the
prompt is read from them, whether the UNet also takes SDXL's pooled text and size ids, and
which diffusers pipeline holds them. Detection is here too, with the same answer from the three
places a model can be seen: single-file checkpoint keys, a diffusers folder's configs, a loaded
pipeline. Everything else asks; nothing else compares architecture names or counts encoders.

This module imports neither torch nor diffusers at import time, so file-format code can take
the embedding keys from here without loading models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tinv_lib.common.errors import TinvError

# Keys of an embedding's vectors in files: A1111/kohya name SDXL's two encoders `clip_l` and
# `clip_g`; a single-encoder embedding saved as a bare tensor is stored under `emb_params`.
SINGLE_KEY = "emb_params"
CLIP_L = "clip_l"
CLIP_G = "clip_g"
T5 = "t5"  # FLUX.1's and SD3's T5-XXL (files also carry it as ComfyUI's `t5xxl`: embeddings/formats.py)
MAX_T5_LENGTH = 512  # the longest T5 prompt diffusers' FLUX.1 and SD3 pipelines take (`max_sequence_length`)

_V = TypeVar("_V")  # what is kept per encoder: vectors, widths, row counts

_OPENAI_CLIP_ACTIVATION = "quick_gelu"  # OpenAI CLIP-L (SD1) uses it; OpenCLIP (SD2) uses gelu
_SDXL_CONDITIONER = "conditioner.embedders."  # SDXL-style checkpoints (base and refiner)
_COMFY_PREFIX = "model.diffusion_model."  # where single files in ComfyUI's layout keep the denoiser


class ModelLoadError(TinvError):
    """The base model cannot be found, read, recognised or matched to its configuration.

    Defined beside detection (and re-exported by `loading`) so that an unrecognised model and an
    unreadable one reach the user as the same kind of one-line error."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One tokenizer + text encoder pair of an architecture, as each format names it."""

    embedding_key: str  # key of this encoder's vectors in embedding files
    tokenizer: str  # pipeline attribute and sub-folder of a diffusers model
    text_encoder: str  # pipeline attribute and sub-folder of a diffusers model
    checkpoint_prefix: str  # where its weights live in a single-file (original layout) checkpoint
    open_clip: bool  # OpenCLIP layout in single files (fused q/k/v); else OpenAI CLIP's
    with_projection: bool  # has the text projection that gives SDXL's pooled text
    is_t5: bool = False  # a T5 encoder: SentencePiece pieces (no `</w>`), no 77-token windows
    # SD3 pools CLIP-L unprojected: its single files hold no projection to read, and loading
    # gives an identity one (as diffusers' `from_single_file` does)
    identity_projection_in_files: bool = False

    def model_class(self) -> Any:
        """The transformers class of this text encoder."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        if self.is_t5:
            return T5EncoderModel
        return CLIPTextModelWithProjection if self.with_projection else CLIPTextModel

    def tokenizer_class(self) -> Any:
        """The transformers class of this encoder's tokenizer."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        return T5TokenizerFast if self.is_t5 else CLIPTokenizer


@dataclass(frozen=True)
class Architecture:
    """One Stable Diffusion generation, described by what differs between generations."""

    name: str  # "sd1" | "sd2" | "sdxl": ModelInfo.arch, messages, training metadata
    encoders: tuple[TextEncoderSlot, ...]  # in pipeline order
    checkpoint_marker: str  # key prefix that identifies it in a single-file checkpoint
    penultimate_hidden_state: bool  # prompt embeds are the second-to-last layer's output
    text_time_conditioning: bool  # the UNet also takes pooled text and size ids (`text_time`)
    probe_v_prediction: bool  # single files come as eps or v without saying which (SD2)
    pipeline_class_name: str  # the diffusers pipeline class
    has_safety_checker: bool  # the pipeline class expects a safety checker (never loaded here)
    flow_model: str = ""  # "flux" | "sd3": a transformer trained by flow matching (`models/flow.py`)
    t5_max_length: int = 0  # T5 ids per prompt: the pipeline's default `max_sequence_length`

    @property
    def flow_matching(self) -> bool:
        """The denoiser is a flow-matching transformer (FLUX.1, SD3), not a DDPM-trained UNet."""
        return bool(self.flow_model)

    @property
    def has_t5(self) -> bool:
        """One of the text encoders is T5 (FLUX.1, SD3)."""
        return any(slot.is_t5 for slot in self.encoders)

    @property
    def label(self) -> str:
        """The name as users read it: SD1, SD2, SDXL."""
        return self.name.upper()

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """The name of each encoder's vectors, in pipeline order: their key in an embedding's
        dict, in files and in training checkpoints."""
        return tuple(slot.embedding_key for slot in self.encoders)

    @property
    def selectable_encoders(self) -> tuple[str, ...]:
        """The encoders whose vectors can be trained alone (`--train_encoders`): every one when
        there are several; none when there is one, since choosing it would change nothing."""
        return self.embedding_keys if len(self.encoders) > 1 else ()

    def pack_vectors(self, per_encoder: Mapping[str, _V]) -> _V | dict[str, _V]:
        """Per-encoder values (vectors, widths, counts) in the form an `Embedding` holds them:
        a single encoder's as the bare value (A1111's tensor), several as a dict by key in
        pipeline order. The inverse of `unpack_vectors`."""
        per_encoder = self.unpack_vectors(per_encoder)
        if len(self.encoders) == 1:
            return per_encoder[self.embedding_keys[0]]
        return per_encoder

    def unpack_vectors(self, vectors: _V | Mapping[str, _V], owner: str = "the embedding") -> dict[str, _V]:
        """Per-encoder values by key, in pipeline order, from either form: the bare value of a
        single-encoder architecture, or a dict with exactly this architecture's keys. Anything
        else is a `TinvError` saying that `owner` does not fit this model."""
        keys = self.embedding_keys
        takes = "one text encoder" if len(keys) == 1 else f"vectors for {', '.join(keys)}"
        if len(keys) == 1 and isinstance(vectors, Mapping) and len(vectors) == 1:
            vectors = next(iter(vectors.values()))  # one encoder's file, whatever its key (A1111: any one tensor)
        if not isinstance(vectors, Mapping):
            if len(keys) == 1:
                return {keys[0]: vectors}
            raise TinvError(f"{owner} is a single-encoder embedding and does not fit this {self.label} model ({takes})")
        if set(vectors) != set(keys):
            raise TinvError(f"{owner} has vectors for {', '.join(vectors) or 'no encoder'} and does not fit this "
                            f"{self.label} model ({takes})")
        return {key: vectors[key] for key in keys}

    def embedding_dim(self, widths: list[int]) -> int | dict[str, int]:
        """The embedding width this model takes, in the form `Embedding.dim` has (packed)."""
        return self.pack_vectors(dict(zip(self.embedding_keys, widths)))

    def pipeline_class(self) -> Any:
        """The diffusers pipeline class (imported on first use)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline_kwargs(self) -> dict:
        """Extra arguments when building its pipeline: SD1/SD2 pipelines would otherwise want
        a safety checker and its feature extractor, which are never loaded."""
        if not self.has_safety_checker:
            return {}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


SD1 = Architecture(
    name="sd1",
    encoders=(TextEncoderSlot(SINGLE_KEY, "tokenizer", "text_encoder", "cond_stage_model.transformer.text_model.",
                              open_clip=False, with_projection=False),),
    checkpoint_marker="cond_stage_model.transformer.",
    penultimate_hidden_state=False,
    text_time_conditioning=False,
    probe_v_prediction=False,
    pipeline_class_name="StableDiffusionPipeline",
    has_safety_checker=True,
)
SD2 = Architecture(
    name="sd2",
    encoders=(TextEncoderSlot(SINGLE_KEY, "tokenizer", "text_encoder", "cond_stage_model.model.",
                              open_clip=True, with_projection=False),),
    checkpoint_marker="cond_stage_model.model.",
    penultimate_hidden_state=False,  # the diffusers config already drops the last layer
    text_time_conditioning=False,
    probe_v_prediction=True,
    pipeline_class_name="StableDiffusionPipeline",
    has_safety_checker=True,
)
SDXL = Architecture(
    name="sdxl",
    encoders=(
        TextEncoderSlot(CLIP_L, "tokenizer", "text_encoder", "conditioner.embedders.0.transformer.text_model.",
                        open_clip=False, with_projection=False),
        TextEncoderSlot(CLIP_G, "tokenizer_2", "text_encoder_2", "conditioner.embedders.1.model.",
                        open_clip=True, with_projection=True),
    ),
    checkpoint_marker="conditioner.embedders.1.model.",
    penultimate_hidden_state=True,
    text_time_conditioning=True,
    probe_v_prediction=False,
    pipeline_class_name="StableDiffusionXLPipeline",
    has_safety_checker=False,
)
# FLUX.1 (dev and schnell) and SD3/SD3.5: CLIP-L (+ CLIP-G for SD3) and T5-XXL, flow matching.
# Single files are recognised by their transformer blocks (BFL's / SAI's layout, bare or under
# `model.diffusion_model.`); text encoders in them sit under ComfyUI's `text_encoders.<name>.`.
FLUX = Architecture(
    name="flux",
    encoders=(
        TextEncoderSlot(CLIP_L, "tokenizer", "text_encoder", "text_encoders.clip_l.transformer.text_model.",
                        open_clip=False, with_projection=False),
        TextEncoderSlot(T5, "tokenizer_2", "text_encoder_2", "text_encoders.t5xxl.transformer.",
                        open_clip=False, with_projection=False, is_t5=True),
    ),
    checkpoint_marker="double_blocks.",
    penultimate_hidden_state=False,  # FLUX.1 reads T5's last layer and CLIP-L's pooled output
    text_time_conditioning=False,
    probe_v_prediction=False,
    pipeline_class_name="FluxPipeline",
    has_safety_checker=False,
    flow_model="flux",
    t5_max_length=512,
)
SD3 = Architecture(
    name="sd3",
    encoders=(
        TextEncoderSlot(CLIP_L, "tokenizer", "text_encoder", "text_encoders.clip_l.transformer.text_model.",
                        open_clip=False, with_projection=True, identity_projection_in_files=True),
        TextEncoderSlot(CLIP_G, "tokenizer_2", "text_encoder_2", "text_encoders.clip_g.transformer.text_model.",
                        open_clip=False, with_projection=True),
        TextEncoderSlot(T5, "tokenizer_3", "text_encoder_3", "text_encoders.t5xxl.transformer.",
                        open_clip=False, with_projection=False, is_t5=True),
    ),
    checkpoint_marker="joint_blocks.",
    penultimate_hidden_state=True,  # for both CLIPs; T5's last layer
    text_time_conditioning=False,
    probe_v_prediction=False,
    pipeline_class_name="StableDiffusion3Pipeline",
    has_safety_checker=False,
    flow_model="sd3",
    t5_max_length=256,
)
ARCHITECTURES = {arch.name: arch for arch in (SD1, SD2, SDXL, FLUX, SD3)}
_BY_PIPELINE_CLASS = {arch.pipeline_class_name: arch for arch in (FLUX, SD3)}  # SD1/SD2 share one class
SDXL_KEYS = SDXL.embedding_keys  # ("clip_l", "clip_g"): the two-encoder embedding form


def takes_some_encoders(widths: Mapping[str, int]) -> bool:
    """Whether a model whose encoders have these embedding keys (and widths) uses an embedding
    with vectors for only some of them, in those encoders alone: FLUX.1 and SD3 do (their prompt
    encoding asks `flow_matching`); SDXL, as A1111, takes both encoders' vectors or none."""
    return any(set(arch.embedding_keys) == set(widths) and arch.flow_matching for arch in ARCHITECTURES.values())


def selectable_encoders() -> tuple[str, ...]:
    """Every encoder that some architecture lets train alone, in order, each once: the choices
    of `--train_encoders` besides "all" (known before the model is)."""
    names = (name for arch in ARCHITECTURES.values() for name in arch.selectable_encoders)
    return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------------------------- VAE

_DEFAULT_VAE_FACTOR = 8  # every real SD VAE's (SD1, SD2, SDXL): three downsamplings


def vae_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell, from a VAE's config: every level after the first halves the side."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_factor_of_folders(folders: Iterable[str | Path | None]) -> int:
    """Pixels per latent cell, read from the first of these diffusers folders whose
    `vae/config.json` reads (no weights loaded, so checks can run before the model loads);
    8, every real SD VAE's, when none does (a single file without a config, a hub id)."""
    for folder in folders:
        config = Path(folder) / "vae" / "config.json" if folder else None
        if config is None or not config.is_file():
            continue
        try:
            return vae_factor(json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return _DEFAULT_VAE_FACTOR


# ------------------------------------------------------------------------------- detection


def _from_text_encoders(has_second_encoder: bool, first_activation: str) -> Architecture:
    """The rule folders and pipelines share: a second text encoder means SDXL; otherwise the
    first encoder's activation tells OpenAI CLIP (SD1) from OpenCLIP (SD2)."""
    if has_second_encoder:
        return SDXL
    return SD1 if first_activation == _OPENAI_CLIP_ACTIVATION else SD2


def of_pipeline(pipe: Any) -> Architecture:
    """The architecture of a loaded diffusers pipeline."""
    if type(pipe).__name__ in _BY_PIPELINE_CLASS:
        return _BY_PIPELINE_CLASS[type(pipe).__name__]
    second = getattr(pipe, SDXL.encoders[1].text_encoder, None) is not None
    return _from_text_encoders(second, pipe.text_encoder.config.hidden_act)


def of_folder(folder: Path) -> Architecture:
    """The architecture of a diffusers folder, from its configs alone (no weights read)."""
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") in _BY_PIPELINE_CLASS:
        return _BY_PIPELINE_CLASS[index["_class_name"]]
    if SDXL.encoders[1].text_encoder in index:
        return SDXL  # read no further: SDXL's first encoder is OpenAI CLIP too
    text_config = read_json(folder / SD1.encoders[0].text_encoder / "config.json")
    return _from_text_encoders(False, text_config.get("hidden_act", _OPENAI_CLIP_ACTIVATION))


def of_checkpoint_keys(keys: Iterable[str]) -> Architecture:
    """The architecture of a single-file checkpoint from its key names (A1111's markers)."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(SDXL.checkpoint_marker):
        return SDXL
    if has(_SDXL_CONDITIONER):
        raise ModelLoadError("this looks like an SDXL refiner, which has no prompt encoder to train for")
    for arch in (SD2, SD1):
        if has(arch.checkpoint_marker):
            return arch
    for arch in (FLUX, SD3):  # original BFL / SAI layouts, bare or under ComfyUI's prefix
        if has(arch.checkpoint_marker) or has(_COMFY_PREFIX + arch.checkpoint_marker):
            return arch
    raise ModelLoadError("not a Stable Diffusion checkpoint (no known text-encoder keys)")


def read_json(path: Path) -> dict:
    """A config file of a diffusers folder, with one-line errors."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing (is {path.parent} a diffusers model folder?)") from None
    except ValueError as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None
