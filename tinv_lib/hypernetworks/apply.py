"""Applying hypernetworks to a diffusers UNet through its attention processors.

A1111 transforms the context of every attention layer before the key and value projections:
`k = to_k(hn_k(context))`, `v = to_v(hn_v(context))`, where context is the text encoding for
cross-attention and the layer's own input for self-attention
(docs/hypernetworks.md, "What it is"). The module is
chosen by the context width; a width without a module passes through; several hypernetworks
apply one after the other, in order.

We do this by wrapping each affected layer's processor. The wrapper hands the original
processor a view of the layer whose `to_k` / `to_v` first run the hypernetwork chain, so the
attention itself is computed by the processor the pipeline already uses (SDPA by default,
xformers, sliced, ...). With multiplier 0 the numbers are therefore exactly those of the bare
model. Processors are plain objects, not modules, so the hypernetwork weights never become
part of the UNet's parameters or state dict.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinv_lib.common.errors import TinvError
from tinv_lib.hypernetworks.module import Hypernetwork, HypernetworkModule

logger = logging.getLogger(__name__)

Stack = Sequence[tuple[Hypernetwork, float]]
"""Hypernetworks to apply, in order, each with its multiplier (ignored in training mode)."""


def refuse_flow_models(model: str | Path, architecture: Any = None, model_config: str | Path | None = None) -> None:
    """Hypernetworks transform the context of a UNet's attention layers; FLUX.1's and SD3's
    transformers attend jointly over text and image tokens and have no such context, so a
    hypernetwork cannot apply. Refused in one line, from the loaded model's `architecture` or,
    before loading, from a diffusers folder's configs (a single file's: its `model_config`;
    anything else is left to the loader)."""
    from tinv_lib.models.architecture import ModelLoadError, of_folder

    if architecture is None:
        folder = next((Path(f) for f in (model, model_config) if f and Path(f).is_dir()), None)
        try:
            architecture = of_folder(folder) if folder is not None else None
        except ModelLoadError:
            return
    if architecture is not None and architecture.flow_matching:
        raise TinvError(f"{model}: hypernetworks act on a UNet's cross-attention, and this {architecture.label} model "
                        "is a transformer without one: FLUX.1 and SD3 take embeddings (train_textual_inversion.py)")


def _attention_layers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's diffusers `Attention` layers: anything with a processor and a `to_k`."""
    return [m for m in unet.modules() if hasattr(m, "set_processor") and isinstance(getattr(m, "to_k", None), nn.Linear)]


def context_widths(unet: nn.Module) -> list[int]:
    """Every width of a context entering `to_k`/`to_v`: the default hypernetwork sizes.

    Cross-attention widths first, then self-attention widths, each ascending: for SD1 this is
    A1111's default `768, 320, 640, 1280`; SD2 gives 1024 first, SDXL 2048 (with self-attention
    widths 640 and 1280), which A1111 never offered.
    """
    cross = {layer.to_k.in_features for layer in _attention_layers(unet) if getattr(layer, "is_cross_attention", False)}
    own = {layer.to_k.in_features for layer in _attention_layers(unet)} - cross
    return sorted(cross) + sorted(own)


class _ChainedProjection:
    """`to_k` or `to_v` as the processor sees it: the hypernetwork chain, then the Linear.
    Attribute reads (weight, in_features, ...) go to the real Linear."""

    def __init__(self, projection: nn.Linear, chain: Sequence[tuple[HypernetworkModule, float]]) -> None:
        self._projection = projection
        self._chain = chain

    def __call__(self, context: torch.Tensor) -> torch.Tensor:
        for module, multiplier in self._chain:
            context = module(context, multiplier)
        return self._projection(context)

    def __getattr__(self, name: str):
        return getattr(self._projection, name)


class _AttentionView:
    """The attention layer as the wrapped processor sees it: itself, but with chained
    `to_k` / `to_v`. Everything else is read from the real layer."""

    def __init__(self, attn: nn.Module, to_k: _ChainedProjection, to_v: _ChainedProjection) -> None:
        self._attn = attn
        self.to_k = to_k
        self.to_v = to_v

    def __getattr__(self, name: str):
        return getattr(self._attn, name)


class HypernetworkAttnProcessor:
    """Wraps an attention processor; runs the (k, v) hypernetwork chain on the context.

    `chain` holds, in application order, the (k module, v module, multiplier) of every
    hypernetwork that has a module for this layer's context width.
    """

    def __init__(self, base: object, chain: Sequence[tuple[HypernetworkModule, HypernetworkModule, float]]) -> None:
        self.base = base
        self.chain = list(chain)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        view = _AttentionView(
            attn,
            _ChainedProjection(attn.to_k, [(k, multiplier) for k, _, multiplier in self.chain]),
            _ChainedProjection(attn.to_v, [(v, multiplier) for _, v, multiplier in self.chain]),
        )
        if temb is not None:
            kwargs["temb"] = temb
        return self.base(view, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def _device_of(unet: nn.Module) -> torch.device:
    return next(unet.parameters()).device


def install_hypernetworks(unet: nn.Module, stack: Stack) -> Callable[[], None]:
    """Apply `stack` to every attention layer of `unet` whose context width has a module;
    return a function that puts the previous processors back.

    Installing on a UNet that already has hypernetworks appends to their chain (and the
    returned function restores the earlier chain). The hypernetworks are moved to the UNet's
    device; their parameters stay float32.
    """
    device = _device_of(unet)
    for network, _ in stack:
        network.to(device)
    previous: list[tuple[nn.Module, object]] = []
    touched: set[int] = set()
    for layer in _attention_layers(unet):
        width = layer.to_k.in_features
        chain = []
        for index, (network, multiplier) in enumerate(stack):
            pair = network.modules_for(width)
            if pair is not None:
                chain.append((pair[0], pair[1], float(multiplier)))
                touched.add(index)
        if not chain:
            continue
        current = layer.processor
        if isinstance(current, HypernetworkAttnProcessor):
            wrapped = HypernetworkAttnProcessor(current.base, current.chain + chain)
        else:
            wrapped = HypernetworkAttnProcessor(current, chain)
        previous.append((layer, current))
        layer.set_processor(wrapped)
    _warn_unused(unet, stack, touched)

    def restore() -> None:
        for layer, processor in reversed(previous):
            layer.set_processor(processor)

    return restore


def _warn_unused(unet: nn.Module, stack: Stack, touched: set[int]) -> None:
    """A1111 applies without any compatibility check; we at least say when a hypernetwork
    matches no layer at all (e.g. one made for another model family)."""
    for index, (network, _) in enumerate(stack):
        if index not in touched:
            logger.warning(
                "hypernetwork %s has no effect on this model: its sizes %s match none of the "
                "attention context widths %s", network.name, network.sizes, context_widths(unet),
            )


@contextlib.contextmanager
def apply_hypernetworks(unet: nn.Module, stack: Stack) -> Iterator[None]:
    """`with apply_hypernetworks(unet, [(hn, 1.0)]):` the UNet runs with the hypernetworks;
    afterwards its original processors are back (also after an exception)."""
    restore = install_hypernetworks(unet, stack)
    try:
        yield
    finally:
        restore()
