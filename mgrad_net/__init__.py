"""mgrad-net: MGRAD-UNet (Yan, Yang & Chen, Sci. Rep. 2024) for MONAI."""

from __future__ import annotations

import importlib
from typing import Any

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
