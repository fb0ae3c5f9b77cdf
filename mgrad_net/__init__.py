"""mgrad-net: MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 2024) for MONAI."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# MONAI's engines build torch.cuda.amp.GradScaler (deprecated, and disabled without CUDA) and enter
# torch.autocast("cuda") on a CPU (this package's own autocast does the CPU's bf16) on every run:
# warnings about MONAI's internals that no user of this bundle can act on, silenced by their text
warnings.filterwarnings("ignore", r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", r"torch\.cuda\.amp\.GradScaler is enabled, but CUDA is not available", UserWarning)
warnings.filterwarnings("ignore", r"CUDA is not available or torch_xla is imported\. Disabling autocast", UserWarning)

__version__ = "0.1.0"

_SUBMODULES = {
    "checkpoints",
    "config",
    "data",
    "engines",
    "errors",
    "handlers",
    "inference",
    "io",
    "losses",
    "networks",
    "outputs",
    "peers",
    "visualize",
}


def __getattr__(name: str) -> Any:
    # bundle configs write `$import mgrad_net` then `mgrad_net.data.…`; importing on first use keeps
    # light tools (the dataset converters) from paying for torch and MONAI at start-up
    if name in _SUBMODULES:
        return importlib.import_module(f"mgrad_net.{name}")
    raise AttributeError(f"module 'mgrad_net' has no attribute {name!r}")
