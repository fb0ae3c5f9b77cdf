"""Data: datalists, the synthetic default data set, phantoms for tests, the converters' core."""

from __future__ import annotations

import importlib
from typing import Any

# name → submodule; imported on first use, so `mgrad_net.data.convert` does not load MONAI
_EXPORTS = {
    "check_no_overwrite": "outputs",
    "datalist_root": "outputs",
    "input_root": "outputs",
    "prepare_outputs": "outputs",
    "SaveSegmentationd": "outputs",
    "SegmentationWriter": "outputs",
    "SliceAxisLast": "orientation",
    "SliceAxisLastd": "orientation",
    "slice_axis": "orientation",
    "ambiguous_slice_axis": "orientation",
    "load_datalist": "datalist",
    "pair_folder": "datalist",
    "PHANTOM_CLASSES": "phantoms",
    "short_axis_phantom": "phantoms",
    "write_phantom_dataset": "phantoms",
    "synthetic_disks": "synthetic",
    "DataValidationError": "validation",
    "check_class_config": "validation",
    "validate_datalist": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mgrad_net.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mgrad_net.data' has no attribute {name!r}")
