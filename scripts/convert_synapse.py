"""Convert TransUNet's preprocessed Synapse multi-organ CT into 3D NIfTI volumes and a datalist.

Input: the folder TransUNet's data instructions produce (``data/Synapse``), holding
``train_npz/caseXXXX_sliceYYY.npz`` (arrays ``image`` and ``label``, each H×W) and/or
``test_vol_h5/caseXXXX.npy.h5`` (HDF5 datasets ``image`` and ``label``, each Z×H×W).

Output, in ``output_dir``: one volume per case, ``images/caseXXXX.nii.gz`` (float32) and
``labels/caseXXXX_gt.nii.gz`` (uint8), arrays stored H×W×Z (slices along the last axis, which is
the axis our pipeline slices along; training slices stacked in slice-number order) with an
identity affine (TransUNet's preprocessing dropped the voxel spacing, so distances are in
voxels), and ``dataset.json`` with paths relative to ``output_dir``: "training" (the train_npz
cases less ``--val_cases`` of them, every k-th of the sorted cases, which go to "validation") and
"test" (the test_vol_h5 cases, with labels). Label numbering is TransUNet's: 0 background,
1 aorta, 2 gallbladder, 3 left kidney, 4 right kidney, 5 liver, 6 pancreas, 7 spleen, 8 stomach.
The "test" key is left out when there are no test cases, because MONAI's
``load_decathlon_datalist`` fails on an empty "test" list.

Reading ``test_vol_h5`` needs ``h5py`` (``pip install h5py``); converting only ``train_npz``
does not.

Usage::

    python scripts/convert_synapse.py --input_dir=TransUNet/data/Synapse --output_dir=data/synapse_monai
    python scripts/convert_synapse.py --input_dir=TransUNet/data/Synapse --output_dir=data/synapse_monai \\
        --val_cases=2
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mgrad_net.data.convert import (
    ConversionError,
    check_output_dir,
    every_kth,
    prepare_output_dir,
    run_command_line,
    write_datalist,
)
from mgrad_net.io import atomic_save_nifti

DESCRIPTION = "Synapse multi-organ abdominal CT (MICCAI 2015 BTCV), TransUNet's preprocessing and split"
LABELS = {
    "0": "background",
    "1": "aorta",
    "2": "gallbladder",
    "3": "left kidney",
    "4": "right kidney",
    "5": "liver",
    "6": "pancreas",
    "7": "spleen",
    "8": "stomach",
}
SLICE_FILE = re.compile(r"(case\d+)_slice(\d+)\.npz")
VOLUME_FILE = re.compile(r"(case\d+)\.npy\.h5")


def _h5py() -> Any:
    # h5py is needed only for the test volumes, so it stays out of the package's core dependencies.
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading Synapse test volumes (test_vol_h5/*.npy.h5) needs h5py: pip install h5py") from e
    return h5py


def _scan_slices(folder: Path) -> dict[str, list[Path]]:
    """Slice files per case, in slice order; every case must run from slice 0 without gaps."""
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        m = SLICE_FILE.fullmatch(p.name)
        if not m:
            if p.suffix == ".npz":
                raise ConversionError(f"{p}: unexpected name, expected caseNNNN_sliceNNN.npz")
            continue
        index = int(m.group(2))
        slices = found.setdefault(m.group(1), {})
        if index in slices:  # e.g. slice7 and slice007
            raise ConversionError(f"{p}: slice {index} of {m.group(1)} also given by {slices[index].name}")
        slices[index] = p
    if not found:
        raise ConversionError(f"{folder}: no caseNNNN_sliceNNN.npz files in it")
    cases = {}
    for case, slices in sorted(found.items()):
        # Stacking past a gap would shift every later slice against its neighbours without a trace.
        missing = sorted(set(range(max(slices) + 1)) - set(slices))
        if missing:
            raise ConversionError(
                f"{folder}: {case} has slices up to {max(slices)} but not slice(s) {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}"
            )
        cases[case] = [slices[i] for i in sorted(slices)]  # numeric order: slice100 after slice99
    return cases


def _scan_volumes(folder: Path) -> dict[str, Path]:
    cases = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        m = VOLUME_FILE.fullmatch(p.name)
        if m:
            cases[m.group(1)] = p
        elif p.suffix == ".h5":
            raise ConversionError(f"{p}: unexpected name, expected caseNNNN.npy.h5")
    if not cases:
        raise ConversionError(f"{folder}: no caseNNNN.npy.h5 files in it")
    return cases


def _check_label(label: np.ndarray, path: Path) -> np.ndarray:
    """The label as uint8, after checking that it holds only TransUNet's class numbers."""
    if not np.issubdtype(label.dtype, np.number) or np.issubdtype(label.dtype, np.complexfloating):
        raise ConversionError(f"{path}: label has dtype {label.dtype}, expected numbers")
    values = np.unique(label)
    bad = values[(values != np.round(values)) | (values < 0) | (values >= len(LABELS))]
    if bad.size:
        raise ConversionError(f"{path}: label values {bad[:10].tolist()} are not class numbers 0..{len(LABELS) - 1}")
    return label.astype(np.uint8)


def _check_pair(image: np.ndarray, label: np.ndarray, ndim: int, path: Path) -> None:
    if image.ndim != ndim:
        raise ConversionError(f"{path}: image has shape {image.shape}, expected {ndim} dimensions")
    if label.shape != image.shape:
        raise ConversionError(f"{path}: label shape {label.shape} differs from image shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ConversionError(f"{path}: image has dtype {image.dtype}, expected numbers")


def _read_slice(path: Path, data: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """The (image, label) arrays of an .npz file; with ``data=False`` only checks it opens."""
    try:
        # allow_pickle stays False: an .npz holding pickled objects is not data we should execute.
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ConversionError(f"{path}: holds a single array, not an .npz archive of image and label")
        with npz:
            missing = {"image", "label"} - set(npz.files)
            if missing:
                raise ConversionError(f"{path}: no array named {sorted(missing)} (has {sorted(npz.files)})")
            if not data:
                return None
            image, label = npz["image"], npz["label"]
    except ConversionError:
        raise
    except Exception as e:  # numpy/zipfile raise many types for a bad file; all mean "unreadable"
        raise ConversionError(f"{path}: numpy cannot read it as .npz ({type(e).__name__}: {e})") from e
    _check_pair(image, label, 2, path)
    return image, label


def _read_volume(path: Path, data: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """The (image, label) arrays of an .npy.h5 file; with ``data=False`` only checks it opens."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                raise ConversionError(f"{path}: no dataset named {missing} (has {sorted(f.keys())})")
            if not data:
                return None
            image, label = f["image"][()], f["label"][()]
    except ConversionError:
        raise
    except Exception as e:  # h5py raises OSError and others for a bad file; all mean "unreadable"
        raise ConversionError(f"{path}: h5py cannot read it ({type(e).__name__}: {e})") from e
    _check_pair(image, label, 3, path)
    return image, label


def _stack_case(case: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """A case's training slices as H×W×Z image (float32) and label (uint8) volumes."""
    image = label = None
    for z, path in enumerate(paths):
        img, lab = _read_slice(path)
        if image is None:
            image = np.empty(img.shape + (len(paths),), np.float32)
            label = np.empty(img.shape + (len(paths),), np.uint8)
        elif img.shape != image.shape[:2]:
            raise ConversionError(f"{path}: slice shape {img.shape} differs from {case}'s first, {image.shape[:2]}")
        image[..., z] = img
        label[..., z] = _check_label(lab, path)
    return image, label


def main(input_dir: str, output_dir: str, val_cases: int = 0) -> None:
    """Convert Synapse to ``output_dir/{images,labels}`` and ``output_dir/dataset.json``.

    Args:
        input_dir: TransUNet's Synapse folder, holding ``train_npz/`` and/or ``test_vol_h5/``.
        output_dir: where images/, labels/ and dataset.json go; must not be inside ``input_dir``.
        val_cases: number of training cases (every k-th, sorted) moved to "validation".
    """
    if isinstance(val_cases, bool) or not isinstance(val_cases, int) or val_cases < 0:
        raise ConversionError(f"val_cases must be a whole number >= 0, got {val_cases!r}")
    root, out = Path(str(input_dir)), Path(str(output_dir))
    if not root.is_dir():
        raise ConversionError(f"input folder {root} does not exist or is not a folder")
    train_dir, test_dir = root / "train_npz", root / "test_vol_h5"
    if not train_dir.is_dir() and not test_dir.is_dir():
        raise ConversionError(f"{root}: has neither a train_npz/ nor a test_vol_h5/ folder")
    check_output_dir(root, out)

    # Find every structural problem before writing anything; the voxels are read once, while writing.
    train = _scan_slices(train_dir) if train_dir.is_dir() else {}
    test = _scan_volumes(test_dir) if test_dir.is_dir() else {}
    both = sorted(set(train) & set(test))
    if both:
        raise ConversionError(f"{root}: cases {both} appear in both train_npz/ and test_vol_h5/")
    if train and val_cases >= len(train):
        raise ConversionError(f"val_cases={val_cases} leaves no training cases among the {len(train)} in {train_dir}")
    if val_cases and not train:
        raise ConversionError(f"val_cases={val_cases} but {train_dir} is missing: no cases to take validation from")
    for paths in train.values():
        for path in paths:
            _read_slice(path, data=False)
    for path in test.values():
        _read_volume(path, data=False)

    val_names = every_kth(sorted(train), val_cases)
    datalist_path = prepare_output_dir(out)

    splits: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}

    def write(case: str, image: np.ndarray, label: np.ndarray, key: str) -> None:
        entry = {"image": f"images/{case}.nii.gz", "label": f"labels/{case}_gt.nii.gz"}
        # No voxel spacing survives TransUNet's preprocessing: an identity affine, distances in voxels.
        atomic_save_nifti(image, np.eye(4), out / entry["image"])
        atomic_save_nifti(label, np.eye(4), out / entry["label"])
        splits[key].append(entry)

    for case, paths in train.items():
        write(case, *_stack_case(case, paths), "validation" if case in val_names else "training")
    for case, path in test.items():
        image, label = _read_volume(path)
        # Z×H×W -> H×W×Z, so slices lie along the last axis as in the training volumes.
        write(case, image.transpose(1, 2, 0).astype(np.float32), _check_label(label, path).transpose(1, 2, 0), "test")

    write_datalist(datalist_path, "Synapse", DESCRIPTION, LABELS, splits)
    print(
        f"Synapse -> {datalist_path}: training {len(splits['training'])} cases, "
        f"validation {len(splits['validation'])}, test {len(splits['test'])} (with labels)"
    )


if __name__ == "__main__":
    run_command_line(main, "convert_synapse")
