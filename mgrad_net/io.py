"""Atomic file writes: a temporary file in the destination's folder, then a rename.

A crash or a kill mid-write leaves either the old file or the new one, never a truncated one.
The temporary name is random and hidden, in the same folder (a rename is atomic only within one
file system). Not ``tempfile.mkstemp``: its files are mode 0600, and the outputs would stay
unreadable to the other users of a shared data folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from monai.data import NibabelWriter

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "atomic_save_nifti", "keep_previous", "latest_checkpoint", "AtomicNibabelWriter"]


@contextmanager
def atomic_path(dst: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dst``, on failure it is removed.

    ``suffix`` keeps an extension that a writer reads its format from (``.nii.gz`` for nibabel).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write_text(dst: str | os.PathLike, text: str) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_text(text)


def atomic_write_json(dst: str | os.PathLike, data: Any, indent: int = 4) -> None:
    atomic_write_text(dst, json.dumps(data, indent=indent) + "\n")


def atomic_save_nifti(array: np.ndarray, affine: np.ndarray, dst: str | os.PathLike) -> None:
    import nibabel as nib

    with atomic_path(dst, suffix=".nii.gz" if str(dst).endswith(".nii.gz") else ".nii") as tmp:
        nib.save(nib.Nifti1Image(array, affine), str(tmp))


def keep_previous(path: str | os.PathLike) -> Path | None:
    """Before a run replaces ``path`` (say, ``models/model.pt``), copy it to
    ``<stem>_before_<YYYYmmdd-HHMMSS><suffix>`` beside it and log that; return the copy's path.

    A copy, not a rename: the file stays where it is until the run replaces it, so a run that
    fine-tunes from it still finds it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{path.stem}_before_{stamp}{path.suffix}")
    if not kept.exists():
        with atomic_path(kept) as tmp:
            shutil.copy2(path, tmp)
    logging.getLogger("mgrad_net").warning("%s will be replaced by this run; the previous file is kept as %s", path, kept)
    return kept


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """The path of the newest resumable checkpoint in ``ckpt_dir``: the ``<prefix>_epoch=N.pt``
    (as ``CheckpointSaver`` names them) with the largest N.

    Raises:
        FileNotFoundError: naming the folder, when it holds no such file.
    """
    found = []
    for path in Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt"):
        number = path.stem.rsplit("=", 1)[-1]
        if number.isdigit():
            found.append((int(number), path))
    if not found:
        raise FileNotFoundError(
            f"nothing to resume: {ckpt_dir} holds no {prefix}_epoch=<N>.pt (the checkpoint a training run "
            "saves after each epoch); start without --resume, or point --ckpt_dir at the run's folder."
        )
    return str(max(found)[1])


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :func:`atomic_path`: a segmentation file is
    either complete or absent, never a truncated ``.nii.gz`` that a viewer half-reads after a
    crash. Give it to ``SaveImage(d)`` as ``writer``.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:
        name = str(filename)
        suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        with atomic_path(filename, suffix=suffix) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)
