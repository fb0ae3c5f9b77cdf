"""Reading a data set the way the bundle's configs name it: ``dataset_dir`` + ``datalist``.

A data set is either a Decathlon-style datalist JSON (``training`` / ``validation`` / ``test``
lists of ``{"image": …, "label": …}``, paths relative to ``dataset_dir``) or a folder of NIfTI
pairs. The bundle's embedded default, the synthetic phantoms, is written on first use into its
own folder; any other ``dataset_dir`` must exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

from mgrad_net.data.phantoms import write_phantom_dataset
from mgrad_net.errors import DataFormatError, DataNotFoundError

__all__ = ["load_datalist", "pair_folder", "LABEL_SUFFIXES"]

# how a label file is named beside its image: ACDC's "_gt", then common alternatives
LABEL_SUFFIXES = ("_gt", "_seg", "_label")
_NIFTI = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    for ext in _NIFTI:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def pair_folder(folder: str | Path, require_labels: bool = True) -> list[dict[str, str]]:
    """Image/label pairs of a folder: ``X.nii.gz`` with ``X_gt.nii.gz`` (or ``_seg``, ``_label``).
    A file named like a label whose image is not in the folder is an image.

    Raises ``FileNotFoundError`` naming every image without a label when ``require_labels``.
    Every image is listed, ``X.nii`` beside ``X.nii.gz`` included (inference then refuses the two,
    whose outputs would share a name, instead of one being silently left out).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name.endswith(_NIFTI) and not p.name.startswith("."))
    stems: dict[str, list[Path]] = {}
    for path in files:
        stems.setdefault(_stem(path), []).append(path)
    pairs, unpaired = [], []
    for stem, paths in stems.items():
        if any(stem.endswith(s) and stem[: -len(s)] in stems for s in LABEL_SUFFIXES):
            continue  # the label of an image beside it; a name like "heart_seg" alone is an image
        label = next((stems[stem + s][0] for s in LABEL_SUFFIXES if stem + s in stems), None)
        for path in paths:
            if label is None:
                if require_labels:
                    unpaired.append(str(path))
                else:
                    pairs.append({"image": str(path)})
                continue
            pairs.append({"image": str(path), "label": str(label)})
    if unpaired:
        raise DataNotFoundError(
            f"no label file ({', '.join('<name>' + s + '.nii.gz' for s in LABEL_SUFFIXES)}) for: " + "; ".join(unpaired)
        )
    return pairs


def _single_file(image: Path, section: str) -> list[dict[str, str]]:
    """One NIfTI file given as ``dataset_dir``: the one case of every section, with its label where
    one lies beside it (``X_gt.nii.gz``); inference (``test``) takes it without."""
    item = {"image": str(image.resolve())}
    stem = _stem(image)
    for suffix in LABEL_SUFFIXES:
        for ext in _NIFTI:
            label = image.with_name(stem + suffix + ext)
            if label.is_file():
                item["label"] = str(label.resolve())
                return [item]
    if section != "test":
        raise DataNotFoundError(
            f"dataset_dir {str(image)!r} is one image without a label beside it "
            f"({', '.join(stem + s + '.nii.gz' for s in LABEL_SUFFIXES)}): only inference takes it alone."
        )
    return [item]


def load_datalist(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    section: str = "training",
    synthetic_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """The items of one section of a data set, with absolute paths.

    Args:
        dataset_dir: the data set's folder, or a single NIfTI image (with its label beside it, if any).
        datalist: a Decathlon-style JSON (default ``<dataset_dir>/dataset.json``). If it does not
            exist, ``dataset_dir`` is read as a folder of NIfTI pairs: its subfolder named like the
            section (``training/``, ``validation/``, ``test/``) if there is one, else the folder
            itself for every section.
        section: ``training``, ``validation`` or ``test``; a ``test`` section may lack labels.
        synthetic_dir: the embedded default's folder. When ``dataset_dir`` is this folder and it
            holds no datalist yet, the synthetic phantoms are written there first.

    Raises:
        FileNotFoundError: ``dataset_dir`` (or a named datalist) does not exist.
        ValueError: the datalist has no such section.
    """
    root = Path(dataset_dir).expanduser()
    listing = Path(datalist).expanduser() if datalist else root / "dataset.json"
    if synthetic_dir is not None and root.resolve() == Path(synthetic_dir).expanduser().resolve():
        if not listing.exists():
            write_phantom_dataset(root)
    if root.is_file() and root.name.endswith(_NIFTI):
        return _single_file(root, section)
    if not root.is_dir():
        raise DataNotFoundError(f"dataset_dir {str(root)!r} does not exist or is not a folder (or a NIfTI file).")
    if listing.exists():
        try:
            return load_decathlon_datalist(str(listing), True, section, base_dir=str(root))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"datalist {str(listing)!r} is not valid JSON: {err}") from err
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise DataFormatError(f"datalist {str(listing)!r} has no usable {section!r} section: {err}") from err
    if datalist and root / "dataset.json" != listing:
        raise DataNotFoundError(f"datalist {str(listing)!r} does not exist.")
    folder = root / section if (root / section).is_dir() else root
    items = pair_folder(folder, require_labels=section != "test")
    if not items:
        raise DataNotFoundError(f"no NIfTI images in {str(folder)!r} and no datalist {str(listing)!r}.")
    return items
