"""Embedding diagnostics: numbers that tell whether an embedding failed, without a judge.

A failed embedding usually fails in one of two ways its vectors alone reveal: it never left its
init text (its cosine to the vectors training started from stays near 1, so it still means the
init words), or its vectors grew far longer than any word of the vocabulary (so it drowns the
rest of the prompt). For each vector this module reports its L2 norm, where that norm falls among
the vocabulary's row norms (percentile and ratio to the median), its cosine to its init vector
when that is known, and the vocabulary tokens it points at most nearly.

Each vector is compared with the token-embedding matrix of its own text encoder, keyed as the
model's architecture keys the vectors (one key for a single encoder, one per encoder otherwise).

    vocabularies = load_vocabularies("models/toy")          # once per model
    records = diagnose_embedding(load_embedding(path).vectors, vocabularies)
    print(*summary_lines("name", records), *warnings_for("name", records), sep="\\n")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.embeddings.formats import Vectors
from tinv_lib.models.architecture import SINGLE_KEY, Architecture, of_folder

if TYPE_CHECKING:
    from tinv_lib.models.family import ModelFamily

BARELY_MOVED_COSINE = 0.98
"""The "barely moved" warning fires when every vector's cosine similarity to its init vector is
above this: training turned no vector away from its init, so the embedding still means its init
text. On the concept suite (docs/toy_world.md, "Concept suite") no trained embedding came near it:
the lowest cosine to init was at most 0.55, in the ones that failed too (they failed by lacking
vectors, not by standing still)."""

OVERRIDE_NORM_RATIO = 12.0
"""The "overrides prompts" warning fires when some vector's L2 norm is more than this many times
the median row norm of its text encoder's vocabulary: such a vector outweighs the words around it
in a prompt. A ratio rather than a percentile, because a percentile stops at 100 for every vector
longer than the longest word. Chosen on the concept suite (docs/toy_world.md, "Concept suite"):
every embedding there that worked, prompt edits included, reached 6-10x (the toy vocabulary's
own colour and shape words sit at about 2.5x), so the first value, 3, fired on all of them.
Checked again on 72 embeddings of the suite's tuning half (issue 35, docs/embeddings.md): it
fires on every run at a runaway learning rate (35-58x) or with 16 vectors (19-34x), 9 of the 21
that overrode their prompts and 4 of 44 good ones; the other 12 that overrode sit at 1.0-8.4x,
inside the range of the ones that worked, so no norm threshold catches them (at 8: 10 of 21
overriding, 11 of 44 good)."""

NEAREST_COUNT = 3  # nearest vocabulary tokens reported per vector
_CHUNK_ROWS = 8192  # vocabulary rows per float32 matmul (bounded memory for fp16 weights)

CSV_NAME = "embedding_diagnostics.csv"
CSV_COLUMNS = ["step", "key", "vector", "norm", "norm_percentile", "norm_ratio", "cosine_to_init", "nearest_tokens"]


@dataclass(frozen=True)
class VectorDiagnosis:
    """The diagnostics of one vector of an embedding."""

    key: str  # the encoder's key: "emb_params" for a single encoder, else the architecture's key
    index: int  # row of the vector in its tensor
    norm: float  # L2 norm
    norm_percentile: float  # % of vocabulary rows whose norm is <= this norm (0-100)
    norm_ratio: float  # norm / median vocabulary row norm
    cosine_to_init: float | None  # None when the init vectors are not known
    nearest: tuple[tuple[str, float], ...]  # (token as the tokenizer spells it, cosine), best first

    def as_dict(self) -> dict:
        """Plain data (for JSON)."""
        return asdict(self)


class Vocabulary:
    """One text encoder's token-embedding matrix and tokenizer, with its row norms computed once
    (sorting them is the costly part when many embeddings are diagnosed against one model).

    The weights are kept by reference, not copied: during training they are the frozen encoder's
    own rows, possibly fp16 on a GPU."""

    def __init__(self, weights: torch.Tensor, tokenizer: Any):
        self.weights = weights.detach()
        self.tokenizer = tokenizer
        self.norms = torch.linalg.vector_norm(self.weights, dim=1, dtype=torch.float32).cpu()
        self.sorted_norms = self.norms.sort().values
        self.median_norm = float(self.sorted_norms.median())

    @property
    def width(self) -> int:
        return int(self.weights.shape[1])

    @classmethod
    def of_text_encoder(cls, tokenizer: Any, text_encoder: Any) -> Vocabulary:
        """The vocabulary of a loaded (transformers) text encoder."""
        return cls(text_encoder.get_input_embeddings().weight, tokenizer)


def vocabularies_of(family: ModelFamily) -> dict[str, Vocabulary]:
    """The vocabularies of a loaded model (`family_of(pipe)`), keyed as its embedding vectors are."""
    return _vocabularies(family.architecture, family.tokenizers, family.text_encoders)


def _vocabularies(architecture: Architecture, tokenizers: Sequence[Any], text_encoders: Sequence[Any]) -> dict[str, Vocabulary]:
    keys = architecture.embedding_keys
    return {key: Vocabulary.of_text_encoder(tok, enc) for key, tok, enc in zip(keys, tokenizers, text_encoders)}


def load_vocabularies(model: str | os.PathLike, model_config: str | os.PathLike | None = None) -> dict[str, Vocabulary]:
    """The vocabularies of a model. A diffusers folder is read for its tokenizer(s) and text
    encoder(s) only (no UNet or VAE: seconds instead of a whole pipeline); single files and hub
    ids go through the full loader (`--model_config` rules apply)."""
    folder = Path(model)
    if not folder.is_dir():
        from tinv_lib.models.family import family_of
        from tinv_lib.models.loading import load_base_model

        return vocabularies_of(family_of(load_base_model(folder, model_config)[0]))
    architecture = of_folder(folder)
    slots = architecture.encoders
    try:
        tokenizers = [slot.tokenizer_class().from_pretrained(folder / slot.tokenizer) for slot in slots]
        encoders = [slot.model_class().from_pretrained(folder / slot.text_encoder) for slot in slots]
    except (OSError, ValueError) as error:
        raise TinvError(f"{folder}: cannot load its tokenizer and text encoder ({str(error).splitlines()[0]})") from None
    return _vocabularies(architecture, tokenizers, encoders)


def diagnose(vectors: torch.Tensor, vocab_weights: torch.Tensor, tokenizer: Any,
             init_vectors: torch.Tensor | None = None, key: str = SINGLE_KEY) -> list[VectorDiagnosis]:
    """Diagnostics of `[n, width]` vectors against one `[vocab, width]` token-embedding matrix.

    For many embeddings against one model, build the `Vocabulary` once and call
    `diagnose_vectors` (or `diagnose_embedding`) instead."""
    return diagnose_vectors(vectors, Vocabulary(vocab_weights, tokenizer), init_vectors, key)


def diagnose_vectors(vectors: torch.Tensor, vocabulary: Vocabulary, init_vectors: torch.Tensor | None = None,
                     key: str = SINGLE_KEY) -> list[VectorDiagnosis]:
    """Diagnostics of `[n, width]` vectors against one vocabulary (see `VectorDiagnosis`)."""
    vectors = vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1])
    if vectors.shape[1] != vocabulary.width:
        raise TinvError(f"{key}: vectors of width {vectors.shape[1]} do not fit a vocabulary of width {vocabulary.width}")
    if init_vectors is not None and tuple(init_vectors.shape) != tuple(vectors.shape):
        raise TinvError(f"{key}: init vectors {tuple(init_vectors.shape)} do not match the vectors {tuple(vectors.shape)}")
    norms = torch.linalg.vector_norm(vectors, dim=1)
    below = torch.searchsorted(vocabulary.sorted_norms, norms, right=True)
    percentiles = below.double() * 100.0 / len(vocabulary.sorted_norms)
    nearest = _nearest_tokens(vectors, norms, vocabulary)
    init = init_vectors.detach().to("cpu", torch.float32) if init_vectors is not None else None
    return [
        VectorDiagnosis(key, i, float(norms[i]), float(percentiles[i]), float(norms[i]) / max(vocabulary.median_norm, 1e-12),
                        _cosine(vectors[i], init[i]) if init is not None else None, nearest[i])
        for i in range(vectors.shape[0])
    ]


def diagnose_embedding(vectors: Vectors, vocabularies: dict[str, Vocabulary],
                       init_vectors: Vectors | None = None) -> list[VectorDiagnosis]:
    """Diagnostics of a whole embedding (a tensor, or a dict by encoder key) against the
    vocabularies of a model (`load_vocabularies` / `vocabularies_of`); each encoder's vectors
    against that encoder's own vocabulary. Raises `TinvError` if the embedding does not fit."""
    by_key = _by_key(vectors, vocabularies)
    init = _by_key(init_vectors, vocabularies) if init_vectors is not None else {}
    return [record for key, value in by_key.items()
            for record in diagnose_vectors(value, vocabularies[key], init.get(key), key)]


def _by_key(vectors: Vectors, vocabularies: dict[str, Vocabulary]) -> dict[str, torch.Tensor]:
    """Vectors keyed as the vocabularies are, or a one-line reason why they do not fit the model."""
    if not isinstance(vectors, dict):
        vectors = {SINGLE_KEY: vectors}
    widths = {key: int(value.shape[-1]) for key, value in vectors.items()}
    model_widths = {key: vocabulary.width for key, vocabulary in vocabularies.items()}
    if widths != model_widths:
        raise TinvError(f"vectors of width {_widths_text(widths)} do not fit this model (text width "
                        f"{_widths_text(model_widths)})")
    return vectors


def _widths_text(widths: dict[str, int]) -> str:
    return str(widths[SINGLE_KEY]) if list(widths) == [SINGLE_KEY] else ", ".join(f"{k} {v}" for k, v in widths.items())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity; two zero vectors count as identical (1), one zero vector as unrelated (0),
    so an all-zero init that never moved still reads as "barely moved"."""
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 if norm_a == norm_b else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (norm_a * norm_b)))  # no 1.0000001 from rounding


def _nearest_tokens(vectors: torch.Tensor, norms: torch.Tensor, vocabulary: Vocabulary) -> list[tuple[tuple[str, float], ...]]:
    """The `NEAREST_COUNT` vocabulary tokens of highest cosine to each vector."""
    weights = vocabulary.weights
    dots = torch.cat([weights[start:start + _CHUNK_ROWS].to(torch.float32) @ vectors.to(weights.device).T
                      for start in range(0, weights.shape[0], _CHUNK_ROWS)]).cpu()
    cosines = (dots / (vocabulary.norms[:, None] * norms[None, :]).clamp_min(1e-12)).clamp(-1.0, 1.0)
    values, ids = cosines.topk(min(NEAREST_COUNT, cosines.shape[0]), dim=0)
    result = []
    for column in range(vectors.shape[0]):
        tokens = vocabulary.tokenizer.convert_ids_to_tokens(ids[:, column].tolist())
        result.append(tuple((str(token), float(value)) for token, value in zip(tokens, values[:, column])))
    return result


# ------------------------------------------------------------------------------ reporting


def warnings_for(name: str, records: Sequence[VectorDiagnosis]) -> list[str]:
    """One line per warning that fires for the embedding `name` (none for an ordinary one)."""
    lines = []
    cosines = [r.cosine_to_init for r in records if r.cosine_to_init is not None]
    if records and len(cosines) == len(records) and min(cosines) > BARELY_MOVED_COSINE:
        lines.append(f"warning: {name} barely moved from its init: every vector's cosine to its init is above "
                     f"{BARELY_MOVED_COSINE:g} (lowest {min(cosines):.4f}), so it still means its init text; "
                     "train more steps or with a higher learning rate")
    over = [r for r in records if r.norm_ratio > OVERRIDE_NORM_RATIO]
    if over:
        worst = max(over, key=lambda r: r.norm_ratio)
        lines.append(f"warning: {name} may override prompts: {len(over)} of {len(records)} vectors are longer than "
                     f"{OVERRIDE_NORM_RATIO:g}x the vocabulary's median norm (longest {worst.key}[{worst.index}]: norm "
                     f"{worst.norm:.4g}, {worst.norm_ratio:.1f}x the median, percentile {worst.norm_percentile:.1f}); "
                     "try fewer steps, a lower learning rate, fewer vectors or direction-only training (--norm_mode "
                     "direction, tinv's default on init text)")
    return lines


def summary_lines(name: str, records: Sequence[VectorDiagnosis]) -> list[str]:
    """One readable line per vector."""
    return [f"{name} {r.key}[{r.index}]: norm {r.norm:.4g} (percentile {r.norm_percentile:.1f}, "
            f"{r.norm_ratio:.2f}x median)"
            + (f", cosine to init {r.cosine_to_init:.4f}" if r.cosine_to_init is not None else "")
            + f", nearest {nearest_text(r)}" for r in records]


def nearest_text(record: VectorDiagnosis) -> str:
    """`token cosine; token cosine; ...` (the CSV's `nearest_tokens` column)."""
    return "; ".join(f"{token} {cosine:.3f}" for token, cosine in record.nearest)


def csv_rows(step: int, records: Sequence[VectorDiagnosis]) -> list[list]:
    """Rows of `embedding_diagnostics.csv` (columns `CSV_COLUMNS`) for one save."""
    return [[step, r.key, r.index, f"{r.norm:.6g}", f"{r.norm_percentile:.3f}", f"{r.norm_ratio:.4f}",
             "" if r.cosine_to_init is None else f"{r.cosine_to_init:.6f}", nearest_text(r)] for r in records]


def scalars(records: Sequence[VectorDiagnosis]) -> dict[str, float]:
    """TensorBoard scalars, tag -> value: `embedding/<key>/<vector>/<quantity>`."""
    values = {}
    for r in records:
        prefix = f"embedding/{r.key}/{r.index}"
        values[f"{prefix}/norm"] = r.norm
        values[f"{prefix}/norm_percentile"] = r.norm_percentile
        values[f"{prefix}/norm_ratio"] = r.norm_ratio  # times the vocabulary's median norm
        if r.cosine_to_init is not None:
            values[f"{prefix}/cosine_to_init"] = r.cosine_to_init
    return values
