"""Textual-inversion embeddings: files in every format, the embeddings folder, creation.

`python -m tinv_lib.embeddings inspect FILE...` / `convert SRC DST` is the command-line tool;
`docs/embeddings.md` describes the formats and rules.
"""

from tinv_lib.embeddings.create import create_embedding, create_embedding_vectors
from tinv_lib.embeddings.database import EmbeddingDatabase
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
from tinv_lib.embeddings.image_embed import save_png_embedding

__all__ = [
    "Embedding",
    "EmbeddingDatabase",
    "NotAnEmbeddingError",
    "a1111_dict",
    "checksum_of",
    "create_embedding",
    "create_embedding_vectors",
    "embedding_from_data",
    "load_embedding",
    "save_bin",
    "save_embedding",
    "save_png_embedding",
    "save_pt",
    "save_safetensors",
]
