"""Helpers the bundle's handlers share: a batch's source files, which process writes, a finite mean."""

from __future__ import annotations

import math
from typing import Sequence

import torch.distributed as dist

__all__ = ["case_files", "finite_mean", "is_main_process"]


def finite_mean(values: Sequence[float]) -> float | None:
    """The mean of the finite values; ``None`` if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def is_main_process() -> bool:
    """Whether this process writes a run's shared files: the only process, or rank 0 of a distributed run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def case_files(batch: dict | list, image_key: str) -> list[str]:
    """The source file of each case of an engine's batch, ``"?"`` for a case whose image has no
    ``filename_or_obj`` metadata.

    MONAI's trainers keep the batch collated (one dict, its image B×C×…) and its evaluators
    decollate it (a list of per-case dicts), so both forms are read.
    """
    decollated = isinstance(batch, list)
    files: list[str] = []
    for item in batch if decollated else [batch]:
        image = item.get(image_key) if isinstance(item, dict) else None
        names = (getattr(image, "meta", None) or {}).get("filename_or_obj")
        if names is None:
            cases = 1 if decollated or image is None or not hasattr(image, "shape") else int(image.shape[0])
            names = ["?"] * cases
        files.extend([names] if isinstance(names, str) else [str(n) for n in names])
    return files
