"""Keep the libraries' known-irrelevant start-up messages off the user's screen.

Every training run used to print two transformers warnings that torchvision is not installed
and a bitsandbytes line telling the user to `pip install kernels`. A newcomer reads either as an
install step, and neither applies here: tinv never uses the CLIP/SigLIP image processors the
torchvision warnings are about (the PIL fallback they announce is what we want), and bitsandbytes
is only needed for `--use_8bit_adam`, never its 4-bit CPU kernels.

So: bitsandbytes is imported only when 8-bit Adam asks for it (diffusers would otherwise import
it while loading any model), and exactly those messages are dropped by a logging filter on the
logger that emits them. Every other warning, from these loggers too, still shows, except while a
helper model loads under `quiet_transformers_loading` (preprocessing's caption model).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

# logger name -> the messages from it known to be irrelevant to tinv
KNOWN_NOISE = {
    "transformers.utils.import_utils": re.compile(
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"),
    "bitsandbytes.backends.cpu.ops": re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
}


class _DropKnownNoise(logging.Filter):
    """Drops the records whose message starts with `pattern`."""

    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


def silence_known_noise() -> None:
    """Install the filters (once), turn the libraries' loading and saving progress bars off (they
    would bury our one-line reports), and keep diffusers from importing bitsandbytes on its own.
    The one way every script quiets the libraries."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropKnownNoise) for existing in logger.filters):
            logger.addFilter(_DropKnownNoise(pattern))
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    _keep_bitsandbytes_unloaded()


def _keep_bitsandbytes_unloaded() -> None:
    """diffusers imports bitsandbytes as soon as it is installed, to offer quantized loading
    that tinv never asks for; tell it bitsandbytes is absent (our 8-bit Adam imports it itself)."""
    from diffusers.utils import import_utils

    import_utils._bitsandbytes_available = False


@contextlib.contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """Only errors and no bars from transformers while a helper model loads (its loading notes
    would bury our own progress bar); the settings before are restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
