"""A1111 prompt semantics, as text and token ids (docs/formats.md, "Prompt syntax"): emphasis, BREAK, 75-token
chunks with comma backtrack, embedding names matched on tokens, and `<kind:args>` extra-network tags.

Nothing here touches a model: `parse_prompt_attention` works on text, `chunk_prompt` on the
token ids a tokenizer returns. `prompt_encoding.py` turns the chunks into tensors. Keeping the
rules apart from the tensors lets them be tested against A1111's documented examples directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tinv_lib.common.errors import TinvError

CHUNK_LENGTH = 75  # tokens per chunk, BOS and EOS excluded
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack` default
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
BREAK = ("BREAK", -1.0)

_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escapes (a lone backslash too)
    | \( | \[                                  # openers
    | :\s*([+-]?[.\d]+)\s*\)                   # ":1.2)" closes a round bracket with a weight
    | \) | \]                                  # closers
    | [^\\()\[\]:]+                            # plain text
    | :                                        # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(text, weight)` runs with A1111's emphasis rules.

    `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w; nesting multiplies; `\\(` etc. are literal; unclosed
    brackets close at the end; `BREAK` (upper case, a word of its own) becomes `("BREAK", -1)`.
    Adjacent runs of equal weight are merged, so `(a)(b)` is one run.
    """
    runs: list[list[Any]] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_starts.append(len(runs))
        elif piece == "[":
            square_starts.append(len(runs))
        elif weight is not None and round_starts:
            try:
                scale_from(round_starts.pop(), float(weight))
            except ValueError:
                raise TinvError(f"prompt emphasis weight {weight!r} is not a number") from None
        elif piece == ")" and round_starts:
            scale_from(round_starts.pop(), _ROUND)
        elif piece == "]" and square_starts:
            scale_from(square_starts.pop(), _SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(piece)):
                if index > 0:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in round_starts:
        scale_from(start, _ROUND)
    for start in square_starts:
        scale_from(start, _SQUARE)
    if not runs:
        runs = [["", 1.0]]
    merged: list[list[Any]] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(text_, weight) for text_, weight in merged]


# ------------------------------------------------------------------------------- embeddings


class EmbeddingLookup:
    """Embedding names as token-id sequences, for longest-match search in tokenized prompts.

    A name is tokenized like prompt text (CLIP's BPE lowercases, so matching is
    case-insensitive); at each prompt position the longest registered sequence wins.
    """

    def __init__(self, embeddings: Mapping[str, Any], tokenize: Callable[[list[str]], list[list[int]]]) -> None:
        entries = [embeddings[name] for name in embeddings]
        id_lists = tokenize([emb.name for emb in entries]) if entries else []
        self._by_first: dict[int, list[tuple[tuple[int, ...], Any]]] = {}
        for ids, embedding in zip(id_lists, entries):
            if ids:
                self._by_first.setdefault(ids[0], []).append((tuple(ids), embedding))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)

    def match(self, tokens: list[int], position: int) -> tuple[Any, int] | None:
        """The embedding whose name starts at `tokens[position]` and its length in tokens."""
        for ids, embedding in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None


# ------------------------------------------------------------------------------- chunks


@dataclass
class EmbeddingFix:
    """An embedding's vectors go into the chunk at `offset` (counted after BOS)."""

    offset: int
    embedding: Any


@dataclass
class PromptChunk:
    """77 token ids (BOS, 75, EOS), a weight per token, and the embeddings to insert."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[EmbeddingFix] = field(default_factory=list)


@dataclass
class ChunkRules:
    """Tokenizer facts the chunker needs. `vectors_of(embedding)` gives its slot count."""

    start_id: int
    end_id: int
    comma_id: int | None
    vectors_of: Callable[[Any], int]
    chunk_length: int = CHUNK_LENGTH
    comma_backtrack: int = COMMA_BACKTRACK


def empty_chunk(rules: ChunkRules) -> PromptChunk:
    """The chunk of an empty prompt: BOS, then EOS to the end."""
    length = rules.chunk_length + 2
    return PromptChunk([rules.start_id] + [rules.end_id] * (length - 1), [1.0] * length)


def chunk_prompt(
    prompt: str,
    tokenize: Callable[[list[str]], list[list[int]]],
    rules: ChunkRules,
    lookup: EmbeddingLookup | None = None,
    emphasis: str = "Original",
) -> list[PromptChunk]:
    """Cut a prompt into 75-token chunks exactly as A1111's `tokenize_line` does.

    * each emphasis run is tokenized on its own, so a name split by a bracket does not match;
    * an embedding takes `vectors` slots with placeholder id 0 and the run's weight, in one
      chunk (a new chunk starts when it would not fit);
    * `BREAK` pads out the current chunk;
    * when a chunk is full and a comma lies within the last `comma_backtrack` tokens, the text
      after that comma moves to the next chunk (with any embedding in it: A1111 leaves the
      embedding's vectors behind in the old chunk, a bug we do not copy);
    * chunks are padded with EOS to 75 and wrapped in BOS/EOS (77 ids).
    """
    if emphasis not in EMPHASIS_MODES:
        raise TinvError(f"unknown emphasis mode {emphasis!r} (choose from {', '.join(EMPHASIS_MODES)})")
    runs = parse_prompt_attention(prompt) if emphasis != "None" else [(prompt, 1.0)]
    token_runs = tokenize([text for text, _ in runs])
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        padding = rules.chunk_length - len(chunk.tokens)
        chunk.tokens = [rules.start_id] + chunk.tokens + [rules.end_id] * padding + [rules.end_id]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * padding + [1.0]
        chunks.append(chunk)
        chunk, last_comma = PromptChunk(), -1

    for tokens, (text, weight) in zip(token_runs, runs):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == rules.comma_id:
                last_comma = len(chunk.tokens)
            elif (
                rules.comma_backtrack
                and len(chunk.tokens) == rules.chunk_length
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= rules.comma_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_multipliers = chunk.tokens[cut:], chunk.multipliers[cut:]
                moved_fixes = [EmbeddingFix(fix.offset - cut, fix.embedding) for fix in chunk.fixes if fix.offset >= cut]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.fixes = [fix for fix in chunk.fixes if fix.offset < cut]
                close_chunk()
                chunk.tokens, chunk.multipliers, chunk.fixes = moved_tokens, moved_multipliers, moved_fixes
            if len(chunk.tokens) == rules.chunk_length:
                close_chunk()
            found = lookup.match(tokens, position) if lookup else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            embedding, name_length = found
            slots = rules.vectors_of(embedding)
            if len(chunk.tokens) + slots > rules.chunk_length:
                close_chunk()
            chunk.fixes.append(EmbeddingFix(len(chunk.tokens), embedding))
            chunk.tokens += [0] * slots
            chunk.multipliers += [weight] * slots
            position += name_length
    if chunk.tokens or not chunks:
        close_chunk()
    return chunks


# ------------------------------------------------------------------------------- extra networks

EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's `<kind:arg:arg>` (docs/formats.md)


def parse_extra_networks(prompt: str) -> tuple[str, dict[str, list[list[str]]]]:
    """Remove every `<kind:arg:arg>` tag from the prompt; return the clean prompt and each kind's
    argument lists in prompt order (A1111 splits the arguments on `:` and leaves the text around a
    tag as it is, spaces included)."""
    found: dict[str, list[list[str]]] = {}

    def take(match: re.Match) -> str:
        found.setdefault(match.group(1), []).append(match.group(2).split(":"))
        return ""

    return EXTRA_NETWORK_TAG.sub(take, prompt), found
