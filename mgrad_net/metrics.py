"""Surface distances in millimetres wherever a case's grid carries its spacing.

MONAI's ``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` take the voxel spacing as a
keyword of each call (``spacing=``), which MONAI's ignite handlers never pass, so a bundle's
distances come out in voxels. The two metrics here read the spacing from each label's own
metadata (the ``MetaTensor``'s affine, as loaded from the NIfTI file, after the bundle's
preprocessing) and hand it to MONAI's computation. A case whose affine is the identity has lost
its spacing (the SSL4MIS form of ACDC, for one): it is measured in voxels, as before, and
:func:`distance_unit` says so, so that a report can name the unit it used.

Use them through MONAI's handler, e.g. in a config::

    {"_target_": "IgniteMetricHandler", "save_details": true,
     "metric_fn": {"_target_": "mgrad_net.metrics.HausdorffDistanceMetric", "percentile": 95}}
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric as _HausdorffDistanceMetric
from monai.metrics import SurfaceDistanceMetric as _SurfaceDistanceMetric

__all__ = ["HausdorffDistanceMetric", "SurfaceDistanceMetric", "case_affines", "distance_unit", "spacing_of"]

MM, VOXELS = "mm", "voxels"


def case_affines(tensor: Any) -> list[torch.Tensor] | None:
    """The affine of each case of a batch-first ``MetaTensor`` (one per sample), or ``None``
    where the tensor carries no metadata."""
    if not isinstance(tensor, MetaTensor):
        return None
    affine = torch.as_tensor(tensor.affine, dtype=torch.float64)
    return list(affine) if affine.ndim == 3 else [affine] * tensor.shape[0]  # batched, or one for all


def distance_unit(affine: torch.Tensor | None) -> str:
    """``"mm"`` for a grid that carries its spacing, ``"voxels"`` for one without (no affine, or
    the identity: the spacing was lost when the file was written)."""
    if affine is None:
        return VOXELS
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return VOXELS if torch.allclose(affine, torch.eye(affine.shape[-1], dtype=affine.dtype)) else MM


def spacing_of(y: Any, spatial_dims: int) -> list[list[float]] | None:
    """Per-case voxel spacing (mm) of a batch-first ``(B, C, *spatial)`` label, for MONAI's
    ``spacing=`` keyword; ``None`` (unit spacing: voxels) when no case carries its spacing."""
    affines = case_affines(y)
    if affines is None or all(distance_unit(a) == VOXELS for a in affines):
        return None
    spacings = []
    for affine in affines:
        r = affine.shape[-1] - 1
        spacing = affine_to_spacing(affine, r=r).tolist() if distance_unit(affine) == MM else [1.0] * r
        spacings.append([float(s) for s in spacing[:spatial_dims]] + [1.0] * max(0, spatial_dims - r))
    return spacings


class HausdorffDistanceMetric(_HausdorffDistanceMetric):
    """MONAI's ``HausdorffDistanceMetric``, in millimetres where the label carries its spacing
    (see the module docstring); an explicit ``spacing=`` keyword still wins."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("spacing", spacing_of(y, y.ndim - 2))
        return super()._compute_tensor(y_pred, y, **kwargs)


class SurfaceDistanceMetric(_SurfaceDistanceMetric):
    """MONAI's ``SurfaceDistanceMetric`` (average surface distance), in millimetres where the
    label carries its spacing (see the module docstring); an explicit ``spacing=`` still wins."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("spacing", spacing_of(y, y.ndim - 2))
        return super()._compute_tensor(y_pred, y, **kwargs)
