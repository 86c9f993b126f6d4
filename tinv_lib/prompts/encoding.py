"""Prompt text to the tensors a diffusers pipeline takes, with A1111's meaning
(docs/formats.md, "Prompt syntax").

`PromptEncoder` chunks a prompt the A1111 way (`prompts.py`), runs each 77-token chunk through
the text encoder(s) with embedding vectors written into the token-embedding output at their
slots (A1111's `EmbeddingsWithFixes`, done here with a forward hook on the embedding layer),
applies emphasis, and concatenates the chunks. The result goes to a diffusers pipeline as
`prompt_embeds` / `negative_prompt_embeds` (plus the pooled embeds for SDXL), so the pipeline
never needs embeddings added to its tokenizer.

Per architecture it does what the diffusers pipelines do with their own encoders, so a prompt
without embeddings or emphasis encodes bit-for-bit as the pipeline would encode it:
SD1/SD2 take the final hidden state; SDXL takes the penultimate hidden state of both encoders,
side by side, and the pooled projection of the second encoder's first chunk. FLUX.1 and SD3 add
a T5 encoder, which reads the prompt as one sequence of the pipeline's `max_sequence_length`
pieces (no start token, `</s>` then padding; longer prompts are cut, as the pipelines cut them);
how their encoders' outputs join is `models.flow.joint_prompt`. Gradients flow
into the inserted vectors, so the trainer can encode its prompts with trainable vectors too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.models.architecture import Architecture
from tinv_lib.models.family import ModelFamily, family_of
from tinv_lib.prompts.syntax import (
    CHUNK_LENGTH,
    COMMA_BACKTRACK,
    EMPHASIS_MODES,
    ChunkRules,
    EmbeddingLookup,
    PromptChunk,
    chunk_prompt,
    empty_chunk,
)


@dataclass
class EncodedPrompts:
    """Encoded prompts: `embeds` [batch, 77·chunks, width]; `pooled` [batch, width] for SDXL;
    `used` the embeddings the prompts used, in order of first use (for `TI hashes`)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    used: list[Any] = field(default_factory=list)


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """Weight each token's hidden state; `Original` then restores the chunk's mean (A1111).

    With all weights 1 the input is returned unchanged, which is also what A1111's arithmetic
    gives (×1, then ×mean/mean = ×1).
    """
    if mode in ("Ignore", "None") or bool((multipliers == 1).all()):
        return z
    scaled = z * multipliers.to(z)[..., None]
    if mode == "No norm":
        return scaled
    return scaled * (z.mean() / scaled.mean())


def pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make cond and uncond the same token length by repeating the shorter one's last vector
    (A1111's padding when prompt and negative prompt have different chunk counts)."""
    difference = cond.shape[1] - uncond.shape[1]
    if difference > 0:
        uncond = torch.cat([uncond, uncond[:, -1:].expand(-1, difference, -1)], dim=1)
    elif difference < 0:
        cond = torch.cat([cond, cond[:, -1:].expand(-1, -difference, -1)], dim=1)
    return cond, uncond


@contextlib.contextmanager
def inserted_vectors(text_encoder: Any, rows: list[tuple[int, int, torch.Tensor]]) -> Iterator[None]:
    """While active, the token-embedding output of batch item b gets `vectors` written at
    positions `start…start+n−1` for each `(b, start, vectors)` in `rows`."""
    if not rows:
        yield
        return

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for item, start, vectors in rows:
            output[item, start : start + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = _token_embedding_layer(text_encoder).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _token_embedding_layer(text_encoder: Any) -> Any:
    """The embedding layer the encoder's forward calls: T5's stack calls its own `embed_tokens`,
    which shares its weight with `get_input_embeddings()` but is another module, so a hook on the
    latter would never fire."""
    layer = getattr(getattr(text_encoder, "encoder", None), "embed_tokens", None)
    return layer if layer is not None else text_encoder.get_input_embeddings()


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids as prompts and embedding names are matched: without BOS/EOS and
    without truncation (chunking handles length)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


class _Encoder:
    """One tokenizer + text encoder pair and how its output is read."""

    def __init__(self, tokenizer: Any, text_encoder: Any, key: str, comma_backtrack: int, t5_length: int = 0) -> None:
        self.tokenizer, self.text_encoder, self.key = tokenizer, text_encoder, key
        self.is_t5 = t5_length > 0  # one sequence of `t5_length` ids: no start token, `</s>`, padding
        end_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        self.width = int(text_encoder.get_input_embeddings().weight.shape[1])
        length = t5_length - 1 if self.is_t5 else CHUNK_LENGTH
        self.rules = ChunkRules(
            start_id=tokenizer.bos_token_id,
            end_id=end_id,
            comma_id=tokenizer.get_vocab().get(",</w>"),
            vectors_of=lambda embedding: min(embedding.vector_count, length),
            chunk_length=length,
            comma_backtrack=comma_backtrack,
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, texts)

    def takes(self, embedding: Any, architecture: Architecture) -> bool:
        """Whether the embedding goes into this encoder: always, except that a FLUX.1/SD3 file
        with vectors for only some encoders (SD3's CLIP-only files) goes into those alone."""
        vectors = embedding.vectors
        return not (architecture.flow_matching and isinstance(vectors, Mapping) and self.key not in vectors)

    def vectors_for(self, embedding: Any, architecture: Architecture) -> torch.Tensor:
        """This encoder's rows of `embedding`, checked against the model's encoders and width."""
        vectors = embedding.vectors
        if architecture.flow_matching and isinstance(vectors, Mapping) and set(vectors) < set(architecture.embedding_keys):
            rows = vectors[self.key]  # some encoders' vectors: `takes` sent only those here
        else:
            rows = architecture.unpack_vectors(vectors, f"embedding '{embedding.name}'")[self.key]
        if rows.shape[-1] != self.width:
            raise TinvError(f"embedding '{embedding.name}' has width {rows.shape[-1]}, the text encoder {self.width}")
        return rows

    def token_tensor(self, chunks: list[PromptChunk]) -> torch.Tensor:
        """Ids of one chunk per batch item; after the first EOS, the tokenizer's pad id (SD2 and
        SDXL's second encoder pad with `!`, as their pipelines do)."""
        tokens = torch.tensor([chunk.tokens[self.is_t5:] for chunk in chunks], dtype=torch.long)
        if self.pad_id != self.rules.end_id:
            first_end = (tokens == self.rules.end_id).int().argmax(dim=1, keepdim=True)
            tokens[torch.arange(tokens.shape[1]) > first_end] = self.pad_id
        return tokens.to(self.text_encoder.device)


class PromptEncoder:
    """A1111 prompt encoding for SD1, SD2 and SDXL pipelines.

    `architecture` says how many encoders there are, which hidden state is the prompt and
    whether there is pooled text. `emphasis` is A1111's mode: `Original` (default), `No norm`,
    `Ignore` or `None` (brackets are literal text). `zero_empty_negative` gives an empty negative
    prompt all-zero embeds, as SDXL does (A1111 and diffusers' `force_zeros_for_empty_prompt`).
    """

    def __init__(
        self,
        architecture: Architecture,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[Any],
        emphasis: str = "Original",
        comma_backtrack: int = COMMA_BACKTRACK,
        zero_empty_negative: bool = False,
        t5_length: int | None = None,
    ) -> None:
        if emphasis not in EMPHASIS_MODES:
            raise TinvError(f"unknown emphasis mode {emphasis!r} (choose from {', '.join(EMPHASIS_MODES)})")
        if not len(tokenizers) == len(text_encoders) == len(architecture.encoders):
            raise TinvError(f"a {architecture.label} prompt encoder needs {len(architecture.encoders)} tokenizer(s) "
                            "and text encoder(s)")
        self.architecture = architecture
        t5_length = architecture.t5_max_length if t5_length is None else t5_length
        self.encoders = [_Encoder(tok, enc, slot.embedding_key, comma_backtrack, t5_length if slot.is_t5 else 0)
                         for tok, enc, slot in zip(tokenizers, text_encoders, architecture.encoders)]
        self.emphasis = emphasis
        self.zero_empty_negative = zero_empty_negative

    @classmethod
    def from_family(cls, family: ModelFamily, emphasis: str = "Original", t5_length: int | None = None) -> PromptEncoder:
        """The encoder for the pipeline of a `ModelFamily`; `t5_length` is the T5 sequence length
        (`--max_sequence_length`, default the pipeline's own)."""
        return cls(family.architecture, family.tokenizers, family.text_encoders, emphasis,
                   zero_empty_negative=family.zero_empty_negative,
                   t5_length=family.t5_length if t5_length is None else t5_length)

    @classmethod
    def from_pipeline(cls, pipe: Any, emphasis: str = "Original", t5_length: int | None = None) -> PromptEncoder:
        """The encoder for a diffusers pipeline of any family tinv knows."""
        return cls.from_family(family_of(pipe), emphasis, t5_length)

    @property
    def expected_dim(self) -> int | dict[str, int]:
        """The embedding width this model takes: an int, or a dict by encoder key (packed)."""
        return self.architecture.embedding_dim([encoder.width for encoder in self.encoders])

    def chunks(self, prompt: str, embeddings: Mapping[str, Any] | None = None) -> list[list[PromptChunk]]:
        """The A1111 chunks of `prompt`, one list per text encoder."""
        result = []
        for encoder in self.encoders:
            usable = {name: embeddings[name] for name in embeddings
                      if encoder.takes(embeddings[name], self.architecture)} if embeddings else None
            lookup = EmbeddingLookup(usable, encoder.tokenize) if usable else None
            result.append(chunk_prompt(prompt, encoder.tokenize, encoder.rules, lookup, self.emphasis))
        return result

    def encode(self, prompts: str | Sequence[str], embeddings: Mapping[str, Any] | None = None) -> EncodedPrompts:
        """Encode a batch of prompts. Prompts with fewer chunks get empty-prompt chunks (A1111)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = [self.chunks(prompt, embeddings) for prompt in prompts]
        count = max(len(chunks) for encoders, slot in zip(zip(*per_prompt), self.encoders) if not slot.is_t5
                    for chunks in encoders)
        outputs, pooled, used, firsts = [], None, [], []
        for index, encoder in enumerate(self.encoders):
            length = 1 if encoder.is_t5 else count  # T5 reads its first (and only) sequence
            batch = [encoders[index] + [empty_chunk(encoder.rules)] * (count - len(encoders[index])) for encoders in per_prompt]
            pieces = []
            for position in range(length):
                chunks = [chunks_of_item[position] for chunks_of_item in batch]
                z, chunk_pooled = self._encode_chunk(encoder, chunks, used)
                pieces.append(z)
                if position == 0:
                    firsts.append(chunk_pooled)
                if position == 0 and chunk_pooled is not None:
                    pooled = chunk_pooled
            outputs.append(torch.cat(pieces, dim=1))
        if self.architecture.flow_matching:
            from tinv_lib.models.flow import joint_prompt

            return EncodedPrompts(*joint_prompt(self.architecture.flow_model, outputs, firsts), used)
        return EncodedPrompts(torch.cat(outputs, dim=-1), pooled if self.architecture.text_time_conditioning else None, used)

    def _encode_chunk(self, encoder: _Encoder, chunks: list[PromptChunk], used: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk position for the whole batch: insert vectors, encode, apply emphasis."""
        rows = []
        for item, chunk in enumerate(chunks):
            for fix in chunk.fixes:
                vectors = encoder.vectors_for(fix.embedding, self.architecture)
                start = fix.offset + (not encoder.is_t5)  # after CLIP's start token
                room = encoder.rules.chunk_length + 1 - start
                rows.append((item, start, vectors[: min(room, vectors.shape[0])]))
                if all(fix.embedding is not seen for seen in used):
                    used.append(fix.embedding)
        tokens = encoder.token_tensor(chunks)
        penultimate = self.architecture.penultimate_hidden_state and not encoder.is_t5
        with inserted_vectors(encoder.text_encoder, rows):
            output = encoder.text_encoder(tokens, output_hidden_states=penultimate)
        z = output.hidden_states[-2] if penultimate else output[0]
        pooled = getattr(output, "text_embeds", None) if self.architecture.text_time_conditioning else None
        if self.architecture.flow_matching and not encoder.is_t5:  # projected (SD3) or plain pooled (FLUX.1)
            pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
        multipliers = torch.tensor([chunk.multipliers[encoder.is_t5:] for chunk in chunks], device=z.device)
        return apply_emphasis(z, multipliers, self.emphasis), pooled

    def pipeline_inputs(
        self, prompt: str, negative_prompt: str = "", embeddings: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Keyword arguments for a diffusers pipeline call (`prompt_embeds`,
        `negative_prompt_embeds`, and for SDXL, FLUX.1 and SD3 the two pooled embeds), plus the
        embeddings used."""
        cond = self.encode([prompt], embeddings)
        if self.zero_empty_negative and negative_prompt == "":
            uncond = EncodedPrompts(torch.zeros_like(cond.embeds), None if cond.pooled is None else torch.zeros_like(cond.pooled))
        else:
            uncond = self.encode([negative_prompt], embeddings)
        embeds, negative = pad_to_same_length(cond.embeds, uncond.embeds)
        inputs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
        if self.architecture.text_time_conditioning or self.architecture.flow_matching:
            inputs["pooled_prompt_embeds"] = cond.pooled
            inputs["negative_pooled_prompt_embeds"] = uncond.pooled
        used = cond.used + [emb for emb in uncond.used if all(emb is not seen for seen in cond.used)]
        return inputs, used
