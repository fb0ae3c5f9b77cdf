"""Convert the ACDC cardiac MRI dataset, as distributed, into a MONAI/Decathlon datalist.

Input: the ACDC root folder holding ``training/`` and/or ``testing/``, each with one
``patientNNN/`` folder per patient containing ``patientNNN_frameNN.nii.gz`` (image),
``patientNNN_frameNN_gt.nii.gz`` (label), ``Info.cfg`` and ``patientNNN_4d.nii.gz`` (ignored).
The end-diastole (ED) and end-systole (ES) frames named in ``Info.cfg`` are converted; without an
``Info.cfg`` every ``patientNNN_frameNN.nii.gz`` of the folder is.

Output, in ``output_dir``: ``images/`` and ``labels/`` (symlinks to the input files, or copies with
``--copy``) and ``dataset.json``, whose paths are relative to ``output_dir``::

    {"name": "ACDC", "labels": {"0": "background", "1": "right ventricle", ...},
     "training": [{"image": "images/patient001_frame01.nii.gz",
                   "label": "labels/patient001_frame01_gt.nii.gz"}, ...],
     "validation": [...], "test": [...]}

Splits are by patient, so a patient's two frames always share a split. ``--val_patients=N`` takes
every k-th patient of the sorted ``training/`` patients (k = number of patients // N, counting
from the k-th) for validation, the rest for training; ``testing/`` patients form "test", with
labels when their ``_gt`` files are there. The "test" key is left out when there are no test
patients, because MONAI's ``load_decathlon_datalist`` fails on an empty "test" list.

Usage::

    python scripts/convert_acdc.py --input_dir=/data/ACDC/database --output_dir=data/acdc_monai
    python scripts/convert_acdc.py --input_dir=/data/ACDC/database --output_dir=data/acdc_monai \\
        --val_patients=20 --copy

Then, in Python: ``monai.data.load_decathlon_datalist("data/acdc_monai/dataset.json", True,
"training")``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mgrad_net.data.convert import (
    ConversionError,
    check_output_dir,
    every_kth,
    prepare_output_dir,
    run_command_line,
    write_datalist,
)
from mgrad_net.io import atomic_path

DESCRIPTION = "Automated Cardiac Diagnosis Challenge, ED and ES frames (Bernard et al., IEEE TMI 2018)"
LABELS = {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
PATIENT_DIR = re.compile(r"patient\d+")
# The 4D cine file ends in "_4d.nii.gz", so it never matches these.
FRAME_IMAGE = re.compile(r"(patient\d+)_frame(\d+)\.nii\.gz")
FRAME_LABEL = re.compile(r"(patient\d+)_frame(\d+)_gt\.nii\.gz")


@dataclass
class Frame:
    image: Path
    label: Path  # where the label is, or would be: error messages name it when it is missing
    labelled: bool


@dataclass
class Patient:
    name: str
    frames: list[Frame] = field(default_factory=list)


def _read_info_cfg(path: Path) -> dict[str, str]:
    info = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read ({e})") from e
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _frame_numbers(patient_dir: Path) -> list[int] | None:
    """The ED and ES frame numbers from Info.cfg, or None where the folder has no Info.cfg."""
    cfg = patient_dir / "Info.cfg"
    if not cfg.is_file():
        return None
    info = _read_info_cfg(cfg)
    numbers = []
    for key in ("ED", "ES"):
        try:
            # Some releases write "1.0"; a frame number is still an integer.
            value = float(info[key])
        except (KeyError, ValueError):
            raise ConversionError(f"{cfg}: no valid '{key}: <frame number>' line") from None
        if value != int(value) or value < 0:
            raise ConversionError(f"{cfg}: '{key}: {info[key]}' is not a frame number")
        numbers.append(int(value))
    return sorted(set(numbers))  # ED == ES would otherwise list one file twice


def _scan_patient(patient_dir: Path, labels_required: bool) -> Patient:
    name = patient_dir.name
    numbers = _frame_numbers(patient_dir)
    files = {p.name for p in patient_dir.iterdir() if p.is_file()}
    if numbers is None:
        numbers = sorted(int(m.group(2)) for f in files if (m := FRAME_IMAGE.fullmatch(f)) and m.group(1) == name)
        if not numbers:
            raise ConversionError(f"{patient_dir}: no Info.cfg and no {name}_frameNN.nii.gz image files")
        # A label whose image is gone means a damaged download; say so rather than drop it quietly.
        for f in sorted(files):
            m = FRAME_LABEL.fullmatch(f)
            if m and m.group(1) == name and int(m.group(2)) not in numbers:
                raise ConversionError(f"{patient_dir / f}: label without its image {name}_frame{m.group(2)}.nii.gz")
    patient = Patient(name)
    for n in numbers:
        image = patient_dir / f"{name}_frame{n:02d}.nii.gz"
        label = patient_dir / f"{name}_frame{n:02d}_gt.nii.gz"
        if not image.is_file():
            raise ConversionError(f"{image}: image not found (frame {n} is named in {patient_dir / 'Info.cfg'})")
        if labels_required and not label.is_file():
            raise ConversionError(f"{label}: label not found for image {image.name}")
        patient.frames.append(Frame(image, label, label.is_file()))
    return patient


def _scan_split(folder: Path, labels_required: bool) -> list[Patient]:
    if not folder.is_dir():
        return []
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and PATIENT_DIR.fullmatch(p.name))
    if not dirs:
        raise ConversionError(f"{folder}: no patientNNN/ folders in it")
    return [_scan_patient(d, labels_required) for d in dirs]


def _load(path: Path) -> np.ndarray:
    try:
        # Reading the voxels, not only the header, is what catches a truncated .gz.
        return np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:  # nibabel raises many types for a bad file; all mean "unreadable"
        raise ConversionError(f"{path}: nibabel cannot read it ({type(e).__name__}: {e})") from e


def _check_frame(frame: Frame) -> None:
    image = _load(frame.image)
    if image.ndim != 3:
        raise ConversionError(f"{frame.image}: expected a 3D volume, found shape {image.shape}")
    if not frame.labelled:
        return
    label = _load(frame.label)
    if label.shape != image.shape:
        raise ConversionError(f"{frame.label}: shape {label.shape} differs from its image's {image.shape}")
    bad = np.setdiff1d(np.unique(label), np.arange(len(LABELS)))
    if bad.size:
        raise ConversionError(f"{frame.label}: label values {bad.tolist()} outside 0..{len(LABELS) - 1}")


class _LinksRefused(Exception):
    """The filesystem or platform made no symbolic link."""


class _Placer:
    """Puts input files into the output folder atomically, as symlinks or copies."""

    def __init__(self, copy: bool) -> None:
        self.symlink = not copy
        self.fallbacks = 0

    def place(self, src: Path, dst: Path) -> None:
        if self.symlink:
            try:
                with atomic_path(dst) as tmp:
                    try:
                        os.symlink(os.path.abspath(src), tmp)
                    except FileExistsError:
                        raise
                    except (OSError, NotImplementedError) as e:
                        raise _LinksRefused from e
                return
            except _LinksRefused:
                # e.g. Windows without the symlink privilege, or a filesystem without links:
                # copy this and every later file instead of failing the whole conversion.
                self.symlink = False
                self.fallbacks += 1
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def main(input_dir: str, output_dir: str, val_patients: int = 10, copy: bool = False) -> None:
    """Convert ACDC to ``output_dir/{images,labels}`` and ``output_dir/dataset.json``.

    Args:
        input_dir: ACDC root, the folder holding ``training/`` and/or ``testing/``.
        output_dir: where images/, labels/ and dataset.json go; must not be inside ``input_dir``.
        val_patients: number of ``training/`` patients (every k-th, sorted) moved to "validation".
        copy: copy the NIfTI files instead of symlinking them (symlinking falls back to copying
            where the filesystem refuses links).
    """
    if isinstance(val_patients, bool) or not isinstance(val_patients, int) or val_patients < 0:
        raise ConversionError(f"val_patients must be a whole number >= 0, got {val_patients!r}")
    if not isinstance(copy, bool):
        raise ConversionError(f"copy must be True or False, got {copy!r}")
    root, out = Path(str(input_dir)), Path(str(output_dir))
    if not root.is_dir():
        raise ConversionError(f"input folder {root} does not exist or is not a folder")
    if not (root / "training").is_dir() and not (root / "testing").is_dir():
        hint = f" (did you mean {root / 'database'}?)" if (root / "database").is_dir() else ""
        raise ConversionError(f"{root}: has neither a training/ nor a testing/ folder{hint}")
    check_output_dir(root, out)

    # Scan and read everything before writing anything, so bad input leaves the output untouched.
    train = _scan_split(root / "training", labels_required=True)
    test = _scan_split(root / "testing", labels_required=False)
    test_frames = [f for p in test for f in p.frames]
    test_labelled = any(f.labelled for f in test_frames)
    if test_labelled and not all(f.labelled for f in test_frames):
        # A test list with and without labels would break a pipeline that loads "label" for all.
        missing = next(f.label for f in test_frames if not f.labelled)
        raise ConversionError(f"{missing}: label not found, though other testing/ frames have labels")
    names = [p.name for p in train + test]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConversionError(f"{root}: patients {dup} appear in both training/ and testing/")
    if train and val_patients >= len(train):
        raise ConversionError(
            f"val_patients={val_patients} leaves no training patients among the {len(train)} in {root / 'training'}"
        )
    for p in train + test:
        for frame in p.frames:
            _check_frame(frame)

    val_names = every_kth([p.name for p in train], val_patients) if train else set()
    datalist_path = prepare_output_dir(out)

    placer = _Placer(copy)
    splits: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for split, patients in (("train", train), ("test", test)):
        for p in patients:
            key = "test" if split == "test" else "validation" if p.name in val_names else "training"
            for frame in p.frames:
                entry = {"image": f"images/{frame.image.name}"}
                placer.place(frame.image, out / entry["image"])
                if frame.labelled:
                    entry["label"] = f"labels/{frame.label.name}"
                    placer.place(frame.label, out / entry["label"])
                splits[key].append(entry)

    write_datalist(datalist_path, "ACDC", DESCRIPTION, LABELS, splits)

    n_val = len(val_names)
    how = "copied" if copy else "symlinked" if not placer.fallbacks else "copied (symlinks not supported here)"
    test_note = " with labels" if test_labelled else " without labels" if test else ""
    print(
        f"ACDC -> {datalist_path}: training {len(train) - n_val} patients / {len(splits['training'])} volumes, "
        f"validation {n_val} / {len(splits['validation'])}, test {len(test)} / {len(splits['test'])}{test_note}; "
        f"files {how}"
    )


if __name__ == "__main__":
    run_command_line(main, "convert_acdc")
