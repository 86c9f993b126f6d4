"""The A1111 hypernetwork: a residual MLP per context width, one for keys and one for values.

A hypernetwork holds, for each enabled context width ("size"), a pair of `HypernetworkModule`s.
The first transforms the context that enters an attention layer's `to_k`, the second the one
that enters `to_v` (docs/formats.md, "Hypernetwork files"). Each module computes
`x + mlp(x) * multiplier`; in training
mode the multiplier is ignored (A1111 trains at strength 1 whatever the prompt says).

The MLP is built exactly as A1111 builds it, module by module, because the file format names
parameters by their position in the `Sequential` (parameter-less activations and dropouts
count). Weight initialisation reproduces A1111's calls in A1111's order, so a network created
after `torch.manual_seed(s)` has the same values as one A1111 creates after the same call.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tinv_lib.common.errors import TinvError
from tinv_lib.common.names import sanitize_name

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def _activation_table() -> dict[str, type[nn.Module]]:
    """A1111's activation lookup: a few fixed names, then every class of
    `torch.nn.modules.activation` under its lowercased name. `swish` is Hardswish, not SiLU:
    a historical A1111 choice that files depend on."""
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    for class_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            table.setdefault(class_name.lower(), cls)
    return table


ACTIVATIONS = _activation_table()

# Names A1111 lists but cannot use: they need constructor arguments or change the width.
_UNUSABLE_ACTIVATIONS = {
    "threshold": "needs constructor arguments",
    "multiheadattention": "is not an activation",
    "glu": "halves the width, so the next layer cannot take its output",
}


def activation_names() -> list[str]:
    """The activation names a hypernetwork can be created with (A1111's list, usable ones)."""
    return [name for name in ACTIVATIONS if name not in _UNUSABLE_ACTIVATIONS]


def parse_number_list(text: str | Sequence[float], what: str) -> list[float]:
    """Parse "1, 2, 1" (the create UI's strings) into floats, as A1111 does; lists pass through."""
    if not isinstance(text, str):
        return [float(value) for value in text]
    try:
        return [float(part.strip()) for part in text.split(",")]
    except ValueError:
        raise TinvError(f"{what} {text!r}: expected comma-separated numbers, e.g. \"1, 2, 1\"") from None


def default_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """A1111's `parse_dropout_structure`: the dropout rule of Dec-2022 files that stored only
    `use_dropout` / `last_layer_dropout`: p = 0.3 after every hidden layer but the last, which
    gets 0.3 only with `last_layer_dropout`. Ints 0 where A1111 writes ints."""
    if not use_dropout:
        return [0] * len(layer_structure)
    hidden = [0.3] * max(len(layer_structure) - 3, 0)
    return [0, *hidden, 0.3 if last_layer_dropout else 0, 0]


@dataclass
class HypernetworkOptions:
    """The architecture of every module of one hypernetwork, named as in the `.pt` file.

    `dropout_structure[i]` is the dropout probability after the i-th layer width; index 0 is
    never used (there is no dropout on the input).
    """

    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation_func: str | None = "linear"
    weight_init: str = "Normal"
    add_layer_norm: bool = False
    activate_output: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] = field(default_factory=lambda: [0, 0, 0])

    def validate(self) -> None:
        """Raise `TinvError` (one line) if A1111 could not build, run or initialise this."""
        self.validate_structure()
        if self.weight_init not in WEIGHT_INITS:
            raise TinvError(f"unknown weight init {self.weight_init!r}; choose from {', '.join(WEIGHT_INITS)}")

    def validate_structure(self) -> None:
        """Raise `TinvError` if the modules cannot be built (all a loaded file needs: its
        weights come from the file, so its `weight_init` is only informative)."""
        structure = self.layer_structure
        for what, values in (("layer structure", structure), ("dropout structure", self.dropout_structure)):
            if not isinstance(values, (list, tuple)) or not all(_is_number(value) for value in values):
                raise TinvError(f"{what} {values!r} is not a list of numbers")
        if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
            raise TinvError(f"layer structure {_fmt(structure)} must start and end with 1, e.g. 1, 2, 1")
        if any(value <= 0 for value in structure):
            raise TinvError(f"layer structure {_fmt(structure)}: every width multiplier must be > 0")
        name = self.activation_func
        if name is not None and (not isinstance(name, str) or name not in ACTIVATIONS):
            raise TinvError(
                f"unknown activation function {name!r}; choose from {', '.join(activation_names())}"
            )
        if name in _UNUSABLE_ACTIVATIONS:
            raise TinvError(f"activation function {name!r} {_UNUSABLE_ACTIVATIONS[name]}")
        dropout = self.dropout_structure
        if len(dropout) != len(structure):
            raise TinvError(
                f"dropout structure {_fmt(dropout)} must have one value per layer-structure value "
                f"({len(structure)})"
            )
        if any(not 0 <= value < 1 for value in dropout):
            raise TinvError(f"dropout structure {_fmt(dropout)}: every value must be in [0, 1)")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{value:g}" for value in values)


def make_options(
    layer_structure: str | Sequence[float] = "1, 2, 1",
    activation_func: str | None = "linear",
    weight_init: str = "Normal",
    add_layer_norm: bool = False,
    use_dropout: bool | None = None,
    dropout_structure: str | Sequence[float] | None = None,
    activate_output: bool = False,
    last_layer_dropout: bool = False,
) -> HypernetworkOptions:
    """Options for a new hypernetwork from the create flags, with A1111's create rules.

    `use_dropout=None` means "on if `dropout_structure` has a non-zero value". With dropout off
    the structure is all zeros (A1111 ignores the typed string then). With dropout on and no
    structure given, the Dec-2022 fixed 0.3 rule applies (`last_layer_dropout` included).
    """
    structure = parse_number_list(layer_structure, "layer structure")
    dropout = None if dropout_structure in (None, "") else parse_number_list(dropout_structure, "dropout structure")
    if use_dropout is None:
        use_dropout = dropout is not None and any(dropout)
    if not use_dropout:
        dropout = [0] * len(structure)
    elif dropout is None:
        dropout = default_dropout_structure(structure, True, last_layer_dropout)
    activation = (activation_func or "linear").lower()
    options = HypernetworkOptions(
        layer_structure=structure,
        activation_func=activation,
        weight_init=weight_init,
        add_layer_norm=add_layer_norm,
        activate_output=activate_output,
        use_dropout=use_dropout,
        dropout_structure=dropout,
    )
    options.validate()
    if dropout[0] != 0 or dropout[-1] != 0:
        raise TinvError(f"dropout structure {_fmt(dropout)}: the first and last values must be 0")
    return options


def _build_layers(dim: int, options: HypernetworkOptions) -> list[nn.Module]:
    """The `Sequential` contents, in A1111's order: Linear, activation, LayerNorm, Dropout per
    step; the last Linear gets an activation only with `activate_output`, and LayerNorm even
    after the last Linear (so the delta itself is normalised)."""
    structure, dropout = options.layer_structure, options.dropout_structure
    activation = ACTIVATIONS.get(options.activation_func or "linear", nn.Identity)
    layers: list[nn.Module] = []
    for i in range(len(structure) - 1):
        width_in, width_out = int(dim * structure[i]), int(dim * structure[i + 1])
        if width_in < 1 or width_out < 1:
            raise TinvError(f"layer structure {_fmt(structure)} gives an empty layer at width {dim}")
        layers.append(nn.Linear(width_in, width_out))
        is_last = i == len(structure) - 2
        if options.activation_func not in (None, "linear") and (options.activate_output or not is_last):
            layers.append(activation())
        if options.add_layer_norm:
            layers.append(nn.LayerNorm(width_out))
        if dropout[i + 1] > 0:
            layers.append(nn.Dropout(p=dropout[i + 1]))
    return layers


def _init_weights(layers: Iterable[nn.Module], options: HypernetworkOptions) -> None:
    """A1111's init for new networks, call for call (the RNG stream must match A1111's).

    Quirks kept on purpose: LayerNorm always gets N(0, 0.01) weights (so it starts near 0, not
    1) whatever the setting; the zero bias of "Normal" is drawn with std 0, which still consumes
    random numbers; Kaiming uses the leaky_relu gain only for the `leakyrelu` activation.
    """
    nonlinearity = "leaky_relu" if options.activation_func == "leakyrelu" else "relu"
    for layer in layers:
        if type(layer) not in (nn.Linear, nn.LayerNorm):
            continue
        weight, bias = layer.weight.data, layer.bias.data
        if options.weight_init == "Normal" or type(layer) is nn.LayerNorm:
            nn.init.normal_(weight, mean=0.0, std=0.01)
            nn.init.normal_(bias, mean=0.0, std=0.0)
            continue
        if options.weight_init == "XavierUniform":
            nn.init.xavier_uniform_(weight)
        elif options.weight_init == "XavierNormal":
            nn.init.xavier_normal_(weight)
        elif options.weight_init == "KaimingUniform":
            nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
        else:
            nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
        nn.init.zeros_(bias)


class HypernetworkModule(nn.Module):
    """One residual MLP for one context width: `y = x + linear(x) * multiplier`.

    Parameters are float32 whatever the UNet's dtype: the input is cast to float32 and the
    output back to the input's dtype (A1111's `cond_cast_float` / `cond_cast_unet`).
    """

    def __init__(self, dim: int, options: HypernetworkOptions, init_weights: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Sequential(*_build_layers(dim, options))
        if init_weights:
            _init_weights(self.linear, options)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        scale = 1.0 if self.training else multiplier
        hidden = x.to(torch.float32)
        return (hidden + self.linear(hidden) * scale).to(x.dtype)


class Hypernetwork(nn.Module):
    """A named set of (k, v) module pairs, one pair per context width, plus the file metadata.

    `parameters()` yields, size by size in file order, the k module's then the v module's
    parameters: A1111's order, so an optimizer state from an A1111 `.optim` sidecar lines up.
    `train()` / `eval()` also switch `requires_grad`, as A1111 does, so a frozen network in a
    preview never collects gradients.
    """

    def __init__(self, name: str, options: HypernetworkOptions) -> None:
        super().__init__()
        self.name = name
        self.options = options
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        self.pairs = nn.ModuleDict()

    @property
    def sizes(self) -> list[int]:
        """The enabled context widths, in file order."""
        return [int(key) for key in self.pairs]

    def add_size(self, size: int, key_module: HypernetworkModule, value_module: HypernetworkModule) -> None:
        """Register the (k, v) pair for context width `size`."""
        self.pairs[str(size)] = nn.ModuleList([key_module, value_module])

    def modules_for(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (k, v) pair for a context of this width, or None: such contexts pass through."""
        pair = self.pairs[str(width)] if str(width) in self.pairs else None
        return None if pair is None else (pair[0], pair[1])

    def train(self, mode: bool = True) -> Hypernetwork:
        super().train(mode)
        for parameter in self.parameters():
            parameter.requires_grad_(mode)
        return self


def create_hypernetwork(
    name: str, sizes: Sequence[int], options: HypernetworkOptions, seed: int | None = None
) -> Hypernetwork:
    """A new hypernetwork with A1111's weight init, in eval mode, on the CPU, float32.

    With `seed`, the values equal A1111's after `torch.manual_seed(seed)` (the global RNG is
    left as it was); without, the global RNG is used, as A1111 does.
    """
    options.validate()
    if len(set(sizes)) != len(sizes) or not sizes or any(int(size) < 1 for size in sizes):
        raise TinvError(f"hypernetwork sizes {list(sizes)}: need one or more distinct positive widths")
    network = Hypernetwork(sanitize_name(name, "hypernetwork"), options)
    with _seeded(seed):
        for size in sizes:
            network.add_size(int(size), HypernetworkModule(int(size), options), HypernetworkModule(int(size), options))
    return network.eval()


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def parse_sizes(text: str | Sequence[int]) -> list[int]:
    """Parse the `--sizes 768,320,640,1280` flag (A1111's UI checkboxes) into ints."""
    if not isinstance(text, str):
        return [int(size) for size in text]
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    if not parts or not all(part.isdigit() for part in parts):
        raise TinvError(f"sizes {text!r}: expected comma-separated widths, e.g. 768,320,640,1280")
    return [int(part) for part in parts]
