"""Creating a fresh embedding from init text, with A1111's rule
(docs/embeddings.md, "Creating an embedding").

A1111 tokenizes the init text without special tokens, keeps at most `num_vectors` tokens, and
fills row i with the token embedding of token `i · n_tokens // num_vectors`, so the init tokens
are spread (or repeated) over the rows. Empty init text gives zero vectors. Copying the model's
own rows is what makes an untrained embedding behave exactly like its init text in a prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.common.names import sanitize_name
from tinv_lib.embeddings.formats import Embedding, Vectors
from tinv_lib.models.family import ModelFamily

MAX_VECTORS = 75  # one 75-token prompt chunk


def init_vectors(tokenizer: Any, text_encoder: Any, init_text: str, num_vectors: int) -> torch.Tensor:
    """`[num_vectors, width]` float32 rows for one text encoder, by A1111's spreading rule."""
    weight = text_encoder.get_input_embeddings().weight
    vectors = torch.zeros(num_vectors, weight.shape[1], dtype=torch.float32)
    if not init_text.strip():
        return vectors
    ids = tokenizer(init_text, add_special_tokens=False)["input_ids"][:num_vectors]
    if not ids:
        raise TinvError(f"init text {init_text!r} gives no tokens")
    rows = weight.detach()[torch.tensor(ids, device=weight.device)].to("cpu", torch.float32)
    for index in range(num_vectors):
        vectors[index] = rows[index * len(ids) // num_vectors]
    return vectors


def create_embedding_vectors(family: ModelFamily, init_text: str, num_vectors: int) -> Vectors:
    """Initial vectors for a new embedding for the model `family` (`family_of(pipe)`): one
    `[num_vectors, width]` block per text encoder, in the form an `Embedding` holds them (the
    architecture packs them). Float32 on the CPU, detached: the trainer makes its own trainable
    copy.
    """
    if not 1 <= num_vectors <= MAX_VECTORS:
        raise TinvError(f"number of vectors must be between 1 and {MAX_VECTORS}, got {num_vectors}")
    keys = family.architecture.embedding_keys
    rows = [init_vectors(tok, enc, init_text, num_vectors) for tok, enc in zip(family.tokenizers, family.text_encoders)]
    return family.architecture.pack_vectors(dict(zip(keys, rows)))


def create_embedding(
    name: str,
    family: ModelFamily,
    init_text: str = "*",
    num_vectors: int = 1,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> Embedding:
    """A fresh (step 0) embedding named `name` (sanitized as A1111 does), ready to save or train."""
    return Embedding(
        name=sanitize_name(name, "embedding"),
        vectors=create_embedding_vectors(family, init_text, num_vectors),
        step=0,
        sd_checkpoint=sd_checkpoint,
        sd_checkpoint_name=sd_checkpoint_name,
    )
