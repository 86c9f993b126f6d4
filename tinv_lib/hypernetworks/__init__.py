"""A1111-compatible hypernetworks: the modules, their `.pt` / `.optim` files, applying them to
a diffusers UNet, and the folder listing that `<hypernet:name:multiplier>` prompt tags look names up in.

* `module`: `HypernetworkModule`, `Hypernetwork`, `make_options`, `create_hypernetwork`.
* `files`: `save_hypernetwork`, `load_hypernetwork`, `save_optimizer_sidecar`,
  `load_optimizer_sidecar`.
* `apply`: `context_widths` (default sizes), `apply_hypernetworks` / `install_hypernetworks`.
* `prompt`: `list_hypernetworks` (the tags are parsed by `tinv_lib.prompts.syntax` and applied by
  `tinv_lib.generation.extra_networks`).
"""

from tinv_lib.hypernetworks.apply import (
    HypernetworkAttnProcessor,
    apply_hypernetworks,
    context_widths,
    install_hypernetworks,
)
from tinv_lib.hypernetworks.files import (
    SavedOptimizer,
    hypernetwork_from_dict,
    hypernetwork_to_dict,
    load_hypernetwork,
    load_optimizer_sidecar,
    optimizer_sidecar_path,
    save_hypernetwork,
    save_optimizer_sidecar,
)
from tinv_lib.hypernetworks.module import (
    ACTIVATIONS,
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkModule,
    HypernetworkOptions,
    activation_names,
    create_hypernetwork,
    make_options,
    parse_sizes,
)
from tinv_lib.hypernetworks.prompt import list_hypernetworks

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
    "HypernetworkModule",
    "HypernetworkOptions",
    "SavedOptimizer",
    "activation_names",
    "apply_hypernetworks",
    "context_widths",
    "create_hypernetwork",
    "hypernetwork_from_dict",
    "hypernetwork_to_dict",
    "install_hypernetworks",
    "list_hypernetworks",
    "load_hypernetwork",
    "load_optimizer_sidecar",
    "make_options",
    "optimizer_sidecar_path",
    "parse_sizes",
    "save_hypernetwork",
    "save_optimizer_sidecar",
]
