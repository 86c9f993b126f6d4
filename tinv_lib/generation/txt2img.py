"""A small txt2img function: a diffusers pipeline driven by A1111 prompt semantics.

`generate()` takes the prompt and negative prompt as A1111 users write them (embedding names,
emphasis, BREAK, extra-network tags), encodes them with `PromptEncoder` and hands the tensors to
the pipeline. It is what `generate.py` and the trainers' previews call.

Extra networks (`<kind:args>` tags such as `<hypernet:name:0.8>`) are removed from the prompt
text first, as in A1111; each kind is served by a handler from `extra_networks`, which gets the
pipeline and the argument lists of that kind's tags and returns a context manager that is
active while the images are made. A kind without a handler is skipped with a notice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tinv_lib.embeddings.database import EmbeddingDatabase
from tinv_lib.models.family import family_of
from tinv_lib.prompts.encoding import PromptEncoder
from tinv_lib.prompts.syntax import parse_extra_networks

ExtraNetworkHandler = Callable[[Any, list[list[str]]], contextlib.AbstractContextManager[Any]]
"""`handler(pipe, [args of each tag of this kind])` → a context manager active during sampling."""


@dataclass
class GenerationResult:
    """Images plus what the infotext and the user need to know about how they were made."""

    images: list[Any]
    prompt: str
    negative_prompt: str
    seed: int
    used_embeddings: list[Any] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def ti_hashes(self) -> str:
        """A1111's `TI hashes` infotext value: `name: shorthash12` per embedding used."""
        return ti_hashes(self.used_embeddings)


def ti_hashes(embeddings: list[Any]) -> str:
    """`name: hash, name: hash` with `:` and `,` removed from names (A1111's infotext rule);
    embeddings without a file hash are left out."""
    entries = []
    for embedding in embeddings:
        if embedding.shorthash:
            name = embedding.name.replace(":", "").replace(",", "")
            entries.append(f"{name}: {embedding.shorthash}")
    return ", ".join(entries)


@contextlib.contextmanager
def _scheduler_for(pipe: Any, sampler: str, schedule_type: str):
    """Swap in the scheduler for an A1111 sampler name; put the model's own back afterwards.
    Flow-matching models keep their own scheduler, the one sampler they have."""
    from tinv_lib.generation.samplers import check_flow_sampler, make_scheduler

    if family_of(pipe).architecture.flow_matching:
        check_flow_sampler(sampler, schedule_type)
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(original.config, sampler, schedule_type)
    try:
        yield
    finally:
        pipe.scheduler = original


def generate(
    pipe: Any,
    prompt: str,
    negative_prompt: str = "",
    *,
    seed: int = 0,
    steps: int = 20,
    cfg_scale: float = 7.0,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    embeddings: Mapping[str, Any] | None = None,
    extra_networks: Mapping[str, ExtraNetworkHandler] | None = None,
    emphasis: str = "Original",
    encoder: PromptEncoder | None = None,
    sampler: str | None = None,
    schedule_type: str = "Automatic",
) -> GenerationResult:
    """Make `batch_size` images; image i uses seed `seed + i` (A1111's batch seeds).

    `embeddings` is an `EmbeddingDatabase` (refreshed here first, so files added or changed
    since the last call are used) or any name → `Embedding` mapping. `sampler` is an A1111
    sampler name (see `tinv_lib.generation.samplers`); it replaces the pipeline's scheduler for this call
    only, so the next call starts again from the model's own scheduler. Without it the
    pipeline's scheduler is used as it is. Returns PIL images and the embeddings used, notices
    (model mismatch, skipped extra networks) included.
    """
    notices: list[str] = []
    encoder = encoder or PromptEncoder.from_pipeline(pipe, emphasis)
    if isinstance(embeddings, EmbeddingDatabase):
        if embeddings.expected_dim is None:  # never let a wrong-width file reach the encoder
            embeddings.set_model(encoder.expected_dim, embeddings.model_hashes, embeddings.model_name)
        before = len(embeddings.notices)
        embeddings.refresh()
        notices += embeddings.notices[before:]
    text, tags = parse_extra_networks(prompt)
    handlers = extra_networks or {}
    with torch.no_grad(), contextlib.ExitStack() as active:
        if sampler is not None:
            active.enter_context(_scheduler_for(pipe, sampler, schedule_type))
        for kind, args in tags.items():
            if kind in handlers:
                active.enter_context(handlers[kind](pipe, args))
            else:
                notices.append(f"Skipping unknown extra network: {kind}")
        inputs, used = encoder.pipeline_inputs(text, negative_prompt, embeddings)
        generators = [torch.Generator(device="cpu").manual_seed(seed + index) for index in range(batch_size)]
        output = pipe(
            **inputs,
            num_inference_steps=steps,
            **family_of(pipe).guidance_arguments(cfg_scale),
            width=width,
            height=height,
            num_images_per_prompt=batch_size,
            generator=generators,
            output_type="pil",
        )
    return GenerationResult(list(output.images), prompt, negative_prompt, seed, used, notices)
