"""The slicing plane: the 2D network sees each volume in its acquisition's own planes.

The preprocessing used to orient every volume to RAS and slice along the last axis, so the
plane came from the affine: a short-axis stack whose affine puts the slice direction along x
(as dcm2niix writes some double-oblique cardiac series) was cut across its slices, and the
segmentation was wrong with exit code 0. Here the plane comes from the voxel grid alone:

- the slice axis is the stored last axis, unless another axis's voxel spacing (the length of
  its affine column) is more than ``min_ratio`` times coarser: then that axis, the coarsest;
- an axis one voxel long is always the slice axis (a single-slice volume);
- the slice axis is moved last, the other two keep their stored order, nothing is flipped;
- a config's ``slice_axis`` names the axis instead, for volumes whose grid cannot tell it (no
  spacing recorded and the slices stored first): :func:`ambiguous_slice_axis` finds those, and
  the data checks refuse them until it is given.

The affine's directions play no part: the same voxels under an axial, sagittal, oblique or LPS
affine give the network the same slices, and so the same segmentation. For volumes stored with
their slices along the last axis (ACDC, the Synapse CT, the synthetic phantoms) the array is left
as it is. The transform is invertible (``Invertd``): predictions go back to the input's exact grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.spatial.functional import orientation
from monai.utils import TraceKeys, TransformBackends, convert_data_type

__all__ = ["slice_axis", "ambiguous_slice_axis", "SliceAxisLast", "SliceAxisLastd"]


def slice_axis(affine: np.ndarray | torch.Tensor, spatial_shape: Sequence[int], min_ratio: float = 1.5) -> int:
    """The index of the spatial axis to slice along (see the module's docstring for the rule).

    Args:
        affine: the volume's ``(N+1)×(N+1)`` voxel-to-world affine.
        spatial_shape: the volume's spatial shape, ``N`` values.
        min_ratio: how much coarser than the stored last axis another axis must be to take its place;
            below it (a near-isotropic volume) the stored last axis is kept.
    """
    ndim = len(spatial_shape)
    single = [i for i, size in enumerate(spatial_shape) if int(size) == 1]
    if single:
        return single[-1]
    affine_np = convert_data_type(affine, np.ndarray)[0].astype(np.float64)
    spacing = np.linalg.norm(affine_np[:ndim, :ndim], axis=0)
    coarsest = max(range(ndim), key=lambda i: (spacing[i], i))  # ties: the later axis
    return coarsest if spacing[coarsest] > min_ratio * spacing[ndim - 1] else ndim - 1


def ambiguous_slice_axis(
    affine: np.ndarray | torch.Tensor, spatial_shape: Sequence[int], min_ratio: float = 1.5
) -> int | None:
    """The axis a volume's slices more likely run along where :func:`slice_axis` can only guess, or
    ``None``: the spacing does not tell the axes apart (no axis ``min_ratio`` times coarser than
    another; an identity affine: the spacing was dropped, as in the SSL4MIS h5 order Z×H×W), yet
    the stored last axis is not the short one: another is at most half as long. A cardiac stack has
    far fewer slices than pixels across a slice."""
    ndim = len(spatial_shape)
    if any(int(size) == 1 for size in spatial_shape):
        return None
    spacing = np.linalg.norm(convert_data_type(affine, np.ndarray)[0].astype(np.float64)[:ndim, :ndim], axis=0)
    if spacing.max() > min_ratio * spacing.min():  # the spacing tells the axes apart: slice_axis's rule holds
        return None
    shortest = min(range(ndim), key=lambda i: (int(spatial_shape[i]), i))
    return shortest if 2 * int(spatial_shape[shortest]) <= int(spatial_shape[-1]) else None


def _ornt(order: Sequence[int]) -> np.ndarray:
    """nibabel's orientation array of a pure permutation: input axis ``order[k]`` becomes axis ``k``."""
    return np.array([[list(order).index(axis), 1] for axis in range(len(order))], dtype=np.float64)


class SliceAxisLast(InvertibleTransform):
    """Move a channel-first volume's slice axis (:func:`slice_axis`, or ``axis`` where given: a spatial
    axis index) last, updating its affine.

    A pure permutation of the stored axes, recorded for :meth:`inverse`; a volume already sliced
    along its last axis is returned unchanged (the transform is still recorded).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, min_ratio: float = 1.5, axis: int | None = None) -> None:
        if min_ratio < 1:
            raise ValueError(f"min_ratio must be at least 1, got {min_ratio}.")
        self.min_ratio = min_ratio
        self.axis = None if axis is None or axis == "" else int(axis)

    def _order(self, affine: np.ndarray, spatial_shape: Sequence[int]) -> list[int]:
        if self.axis is not None and not -len(spatial_shape) <= self.axis < len(spatial_shape):
            raise ValueError(f"slice_axis {self.axis} is not an axis of a {len(spatial_shape)}D volume.")
        if self.axis is not None:
            axis = self.axis % len(spatial_shape)
        else:
            axis = slice_axis(affine, spatial_shape, self.min_ratio)
        return [a for a in range(len(spatial_shape)) if a != axis] + [axis]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``img``: channel first, ``(C, *spatial)``; a ``MetaTensor`` carries its affine (else identity)."""
        spatial_shape = tuple(img.shape[1:])
        if not spatial_shape:
            raise ValueError(f"SliceAxisLast needs a channel-first volume, got shape {tuple(img.shape)}.")
        if isinstance(img, MetaTensor):
            affine = convert_data_type(img.peek_pending_affine(), np.ndarray)[0]
        else:
            affine = np.eye(len(spatial_shape) + 1)
        order = self._order(affine, spatial_shape)
        return orientation(img, affine, _ornt(order), lazy=False, transform_info=self.get_transform_info())

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        original_affine = transform[TraceKeys.EXTRA_INFO]["original_affine"]
        order = self._order(original_affine, [int(s) for s in transform[TraceKeys.ORIG_SIZE]])
        back = [order.index(axis) for axis in range(len(order))]  # the current axis that holds original axis k
        affine = data.peek_pending_affine() if isinstance(data, MetaTensor) else np.eye(len(order) + 1)
        with self.trace_transform(False):
            return orientation(data, affine, _ornt(back), lazy=False, transform_info=self.get_transform_info())


class SliceAxisLastd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`SliceAxisLast`; each key's own affine and shape choose its axis,
    so an image and its label (same grid) are permuted alike."""

    backend = SliceAxisLast.backend

    def __init__(
        self, keys: KeysCollection, min_ratio: float = 1.5, axis: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slicer = SliceAxisLast(min_ratio, axis)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.slicer(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.slicer.inverse(d[key])
        return d
