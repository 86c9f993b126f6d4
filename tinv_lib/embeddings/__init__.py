"""Textual-inversion embeddings: files in every format, the embeddings folder, creation.

`python -m tinv_lib.embeddings inspect FILE...` / `convert SRC DST` is the command-line tool.
"""

from tinv_lib.embeddings.formats import (
    Embedding,
    NotAnEmbeddingError,
    a1111_dict,
    checksum_of,
    embedding_from_data,
    load_embedding,
    save_bin,
    save_embedding,
    save_pt,
    save_safetensors,
)

__all__ = [
    "Embedding",
    "NotAnEmbeddingError",
    "a1111_dict",
    "checksum_of",
    "embedding_from_data",
    "load_embedding",
    "save_bin",
    "save_embedding",
    "save_pt",
    "save_safetensors",
]
