"""Up-front validation of a data set, before any training or inference starts.

Every image (and label) of a datalist is opened and checked, all problems are collected, and
one error lists them, one line per file with the reason, so a bad case stops the run at once
rather than an hour into training, and nothing is written before the data is known to be good.

Accepted volumes: 3D arrays (H×W×Z; ``mgrad_net.data.orientation`` picks the slicing axis), or
4D with a single channel in the last axis. A 2D image is rejected: the bundle's pipelines slice
3D volumes. Any in-plane size is accepted, since every slice is resized to the configured
``roi_size``.

Not an error, a warning naming the file: an image whose intensities look like CT Hounsfield
units (air at about -1000) given to the MRI preset, which scales each volume by its own
percentiles and would segment it as if it were a heart. The user may know better.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mgrad_net.errors import UserError

__all__ = ["DataValidationError", "validate_datalist", "check_class_config"]


class DataValidationError(UserError, ValueError):
    """A data set failed validation; the message has one line per problem, naming the file."""


def _load(path: str, what: str, problems: list[str]):
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        problems.append(f"{path}: {what} file does not exist")
        return None
    if p.stat().st_size == 0:
        problems.append(f"{path}: {what} file is empty")
        return None
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)  # reads (and decompresses) the whole file
    except Exception as err:  # nibabel, gzip and zlib each raise their own kind for a bad file
        problems.append(f"{path}: {what} is not a readable NIfTI file ({type(err).__name__}: {err})")
        return None
    return img, data


def _as_volume(loaded, path: str, what: str, problems: list[str]) -> np.ndarray | None:
    img, data = loaded
    if 0 in img.shape:  # the header's shape: nibabel hands back a flat empty array for it
        problems.append(f"{path}: {what} has a zero-sized dimension, shape {img.shape}")
        return None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        kind = "a 2D image" if data.ndim == 2 else f"a {data.ndim}D array"
        problems.append(
            f"{path}: {what} is {kind} of shape {data.shape}; expected a 3D volume (H, W, Z) "
            "or 4D with one channel last"
        )
        return None
    return data


# voxels at or below this value (HU: lung, air at -1000) do not occur in MR magnitude images
HU_AIR = -500.0
HU_FRACTION = 0.01


def hounsfield_reason(image: np.ndarray) -> str | None:
    """Why ``image`` looks like CT in Hounsfield units (at least 1 % of voxels at or below -500), or ``None``."""
    if image.size == 0 or not np.issubdtype(image.dtype, np.number):
        return None
    low = float(np.mean(image <= HU_AIR))
    if low < HU_FRACTION:
        return None
    return (
        f"{low:.0%} of its voxels are at or below {HU_AIR:g} (range {float(np.nanmin(image)):g} to "
        f"{float(np.nanmax(image)):g}), as air and lung are in CT Hounsfield units; MR intensities are not negative"
    )


def _expects_mri(intensity_transform: Any) -> bool:
    """The MRI preset scales each volume by its own percentiles; the CT preset (synapse.json) windows HU."""
    from monai.transforms import ScaleIntensityRangePercentiles, ScaleIntensityRangePercentilesd

    return isinstance(intensity_transform, (ScaleIntensityRangePercentilesd, ScaleIntensityRangePercentiles))


def validate_datalist(
    items: Sequence[dict],
    num_classes: int,
    require_labels: bool = True,
    affine_atol: float = 1e-3,
    intensity_transform: Any = None,
    slice_axis: int | None = None,
) -> int:
    """Check every item; raise :class:`DataValidationError` listing all problems, or return the count.

    Args:
        items: ``{"image": path, "label": path}`` dicts (absolute paths, as ``load_datalist`` gives).
        num_classes: classes including background; label values must lie in ``0..num_classes-1``.
        require_labels: every item must have a label (training, evaluation); ``False`` for inference.
        affine_atol: largest difference allowed between the image's and the label's affines.
        intensity_transform: the preset's intensity transform; with the MRI preset's percentile
            scaling, an image that looks like CT in Hounsfield units is named in a warning.
        slice_axis: the config's ``slice_axis``; while it is not given, an image whose slice axis
            the grid cannot tell (:func:`mgrad_net.data.orientation.ambiguous_slice_axis`) is a
            problem naming the override.
    """
    from mgrad_net.data.orientation import ambiguous_slice_axis  # MONAI: not for the light converters

    problems: list[str] = []
    mri = _expects_mri(intensity_transform)
    for item in items:
        image_path = str(item.get("image", ""))
        if not image_path:
            problems.append(f"{json.dumps(item)}: no 'image' entry")
            continue
        loaded = _load(image_path, "image", problems)
        image = _as_volume(loaded, image_path, "image", problems) if loaded else None
        if image is not None and np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            bad = int((~np.isfinite(image)).sum())
            problems.append(f"{image_path}: image has {bad} NaN or infinite voxel(s)")
        if image is not None and slice_axis in (None, ""):
            likely = ambiguous_slice_axis(loaded[0].affine, image.shape)
            if likely is not None:
                spacing = [round(float(v), 3) for v in np.linalg.norm(loaded[0].affine[:3, :3], axis=0)]
                problems.append(
                    f"{image_path}: cannot tell its slice axis: its voxel spacing is {spacing} (no axis coarser than "
                    f"the others: was the spacing dropped?) and its last axis ({image.shape[-1]} voxels) is not its "
                    f"short one (axis {likely}: {image.shape[likely]}); pass --slice_axis {likely} if its slices run "
                    f"along axis {likely}, or --slice_axis 2 to slice along the last axis"
                )
        reason = hounsfield_reason(image) if mri and image is not None else None
        if reason:
            logging.getLogger("mgrad_net").warning(
                "%s looks like a CT volume in Hounsfield units, but the preset is for MRI: %s. It is segmented "
                "anyway; for CT, merge configs/synapse.json (its CT window) and use weights trained on CT.",
                image_path, reason,
            )  # fmt: skip
        label_path = item.get("label")
        if label_path is None:
            if require_labels:
                problems.append(f"{image_path}: no label given")
            continue
        label_path = str(label_path)
        loaded_label = _load(label_path, "label", problems)
        label = _as_volume(loaded_label, label_path, "label", problems) if loaded_label else None
        if label is None:
            continue
        values = np.unique(label)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            frac = values[np.isfinite(values) & (values != np.round(values))][:3]
            problems.append(f"{label_path}: label values must be integers, found {frac.tolist() or 'NaN'}")
        elif values.min() < 0 or values.max() >= num_classes:
            outside = [int(v) for v in values if v < 0 or v >= num_classes][:5]
            problems.append(
                f"{label_path}: label values {outside} outside 0..{num_classes - 1} ({num_classes} classes)"
            )
        if image is not None:
            if image.shape != label.shape:
                problems.append(f"{label_path}: label shape {label.shape} differs from image shape {image.shape}")
            elif not np.allclose(loaded[0].affine, loaded_label[0].affine, atol=affine_atol):
                problems.append(f"{label_path}: label affine differs from the image's ({image_path})")
    if problems:
        raise DataValidationError(
            f"{len(problems)} problem(s) in the data set; nothing was trained or written:\n" + "\n".join(problems)
        )
    return len(items)


def check_class_config(class_names: Sequence[str], num_classes: int) -> None:
    """The class count a config uses must name each class, background included, and be at least 2."""
    if int(num_classes) != num_classes or num_classes < 2 or num_classes != len(class_names):
        raise ValueError(
            f"num_classes is {num_classes} but class_names lists {len(class_names)} ({list(class_names)}): "
            "override class_names (num_classes follows it), with background first."
        )
