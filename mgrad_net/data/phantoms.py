"""Synthetic cardiac short-axis volumes: the bundle's embedded default data set.

Each volume is H×W×Z (axial slices along the last axis, as in ACDC) with the ACDC classes:
0 background, 1 right ventricle (RV), 2 myocardium (Myo), 3 left ventricle (LV). The LV is a
disc of blood, the myocardium a ring around it, the RV a crescent beside them; all shrink
towards the apex, and the RV is missing from the apical slices, as in real short-axis stacks.
Intensities mimic cine MRI (bright blood, darker muscle) with smooth background structure and
noise. Generation is deterministic for a seed, so a data set written twice is the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mgrad_net.io import atomic_save_nifti, atomic_write_json

__all__ = ["short_axis_phantom", "write_phantom_dataset", "PHANTOM_CLASSES"]

PHANTOM_CLASSES = {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle"}


def short_axis_phantom(
    shape: tuple[int, int, int] = (128, 128, 8), rng: np.random.RandomState | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume: ``(image float32 in [0, 1], label uint8)``, both ``shape``."""
    rng = rng if rng is not None else np.random.RandomState(0)
    h, w, depth = shape
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    scale = min(h, w) / 128
    r_lv = rng.uniform(10, 16) * scale
    thick = rng.uniform(5, 8) * scale
    angle = rng.uniform(0, 2 * np.pi)  # where the RV sits around the LV
    image = np.empty(shape, np.float32)
    label = np.zeros(shape, np.uint8)

    # smooth background: a few broad blobs standing in for chest wall, lungs and liver
    background = np.full((h, w), 0.15, np.float32)
    for _ in range(4):
        by, bx, br = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 40) * scale
        background += rng.uniform(0.05, 0.25) * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * br**2))

    for z in range(depth):
        base_to_apex = 1.0 - 0.55 * z / max(depth - 1, 1)
        r = r_lv * base_to_apex
        d = np.hypot(yy - cy, xx - cx)
        lv = d <= r
        myo = (d > r) & (d <= r + thick)
        sl = np.zeros((h, w), np.uint8)
        if z < depth - max(1, depth // 4):  # no RV in the apical quarter
            off = r + thick + 0.6 * r
            ry, rx = cy + off * np.sin(angle), cx + off * np.cos(angle)
            rv = (np.hypot(yy - ry, xx - rx) <= 1.3 * r) & (d > r + thick + 1.5 * scale)
            sl[rv] = 1
        sl[myo] = 2
        sl[lv] = 3
        img = background.copy()
        img[sl == 1] = 0.75
        img[sl == 2] = 0.35
        img[sl == 3] = 0.85
        img += rng.normal(0, 0.06, size=(h, w)).astype(np.float32)
        image[..., z] = np.clip(img, 0, 1)
        label[..., z] = sl
    return image, label


def write_phantom_dataset(
    root: str | Path,
    counts: dict[str, int] | None = None,
    shape: tuple[int, int, int] = (128, 128, 8),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
    seed: int = 0,
) -> Path:
    """Write phantom volumes and ``dataset.json`` under ``root``; return the datalist's path.

    ``counts`` gives the volumes per datalist section (default 12 training, 3 validation,
    3 test). Files are written atomically and ``dataset.json`` last, so an interrupted run never
    leaves a datalist that names a missing or partial file.
    """
    counts = counts if counts is not None else {"training": 12, "validation": 3, "test": 3}
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    rng = np.random.RandomState(seed)
    sections: dict[str, list[dict[str, str]]] = {}
    index = 0
    for section, count in counts.items():
        sections[section] = []
        for _ in range(count):
            name = f"phantom_{index:03d}"
            index += 1
            image, label = short_axis_phantom(shape, rng)
            atomic_save_nifti(image, affine, root / "images" / f"{name}.nii.gz")
            atomic_save_nifti(label, affine, root / "labels" / f"{name}_gt.nii.gz")
            sections[section].append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}_gt.nii.gz"})
    datalist = {
        "name": "mgrad-net synthetic short-axis phantoms",
        "description": "Deterministic synthetic cine-MRI-like short-axis volumes with ACDC classes",
        "labels": PHANTOM_CLASSES,
        **sections,
    }
    path = root / "dataset.json"
    atomic_write_json(path, datalist)
    return path
