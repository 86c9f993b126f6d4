"""Names of what the trainers make: one filter for embedding and hypernetwork names.

A1111 cleans both names the same way before it creates the file: only letters, digits and
`._- ` are kept (`create_embedding`, `create_hypernetwork`), and an empty result is an error.
The one difference is ours: an embedding name is also a prompt word, and a prompt never keeps a
word's outer spaces, so they are stripped; a hypernetwork name is a file stem and keeps them, as
in A1111.
"""

from __future__ import annotations

from typing import Literal

from tinv_lib.common.errors import TinvError

KEPT_PUNCTUATION = "._- "


def sanitize_name(name: str, kind: Literal["embedding", "hypernetwork"]) -> str:
    """`name` with only letters, digits and `._- ` kept (an embedding's also stripped of outer
    spaces); a `TinvError` if nothing is left."""
    cleaned = "".join(char for char in name if char.isalnum() or char in KEPT_PUNCTUATION)
    if kind == "embedding":
        cleaned = cleaned.strip()
    if not cleaned:
        raise TinvError(f"{kind} name {name!r} has no usable characters: it is empty after removing all but "
                        f"letters, digits and '{KEPT_PUNCTUATION}'")
    return cleaned
