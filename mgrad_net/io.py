"""Atomic file writes: a temporary file in the destination's folder, then a rename.

A crash or a kill mid-write leaves either the old file or the new one, never a truncated one.
The temporary name is random and hidden, in the same folder (a rename is atomic only within one
file system). Not ``tempfile.mkstemp``: its files are mode 0600, and the outputs would stay
unreadable to the other users of a shared data folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from monai.data import NibabelWriter
from monai.data.image_writer import logger as image_writer_logger

from mgrad_net.errors import CheckpointError, NoCheckpointError, NoSpaceLeftError

__all__ = [
    "read_pretrained_state",
    "atomic_path",
    "is_atomic_leftover",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_nifti",
    "keep_previous",
    "checkpoints_newest_first",
    "latest_checkpoint",
    "no_space_named",
    "AtomicNibabelWriter",
]


@contextmanager
def atomic_path(dst: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dst``, on failure it is removed.

    ``suffix`` keeps an extension that a writer reads its format from (``.nii.gz`` for nibabel).
    ``fsync``: the new file's data reach the disk before the rename, and the rename before the
    return, so that a power cut cannot leave an empty ``dst`` either (checkpoints ask for it;
    a kill of the process alone never loses written data).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp{suffix}")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, dst)
        if fsync:
            _fsync(dst.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextmanager
def no_space_named(dst: str | os.PathLike) -> Iterator[None]:
    """A full file system (``ENOSPC``) while writing ``dst`` becomes
    :class:`~mgrad_net.errors.NoSpaceLeftError`, whose message names the folder and the file."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or isinstance(err, NoSpaceLeftError):
            raise
        raise NoSpaceLeftError(errno.ENOSPC, f"no space left on {Path(dst).parent}: {dst} was not written") from err


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_atomic_leftover(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the temporary file of an :func:`atomic_path` that a killed process left."""
    return re.fullmatch(r"\..+\.[0-9a-f]{12}\.tmp(\.nii(\.gz)?)?", Path(path).name) is not None


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
    """Before a run replaces ``path`` (say, ``models/model.pt`` or ``eval/metrics.csv``), copy it to
    ``<stem>_before_<YYYYmmdd-HHMMSS><suffix>`` beside it and log that; return the copy's path.
    A folder (``pictures/``) is moved instead, since the run writes a new one.

    A file is copied, not renamed: it stays where it is until the run replaces it, so a run that
    fine-tunes from it still finds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    name = path.name
    stem, suffix = (name[: -len(".nii.gz")], ".nii.gz") if name.endswith(".nii.gz") else (path.stem, path.suffix)
    kept = path.with_name(f"{stem}_before_{stamp}{'' if path.is_dir() else suffix}")
    if path.is_dir():
        for n in range(2, 10_000):
            if not kept.exists():
                break
            kept = path.with_name(f"{stem}_before_{stamp}_{n}")
        path.rename(kept)
    elif not kept.exists():
        with atomic_path(kept) as tmp:
            shutil.copy2(path, tmp)
    logging.getLogger("mgrad_net").warning(
        "%s will be replaced by this run; the previous %s is kept as %s",
        path,
        "folder" if kept.is_dir() else "file",
        kept,
    )
    return kept


def checkpoints_newest_first(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """The resumable checkpoints in ``ckpt_dir``, the ``<prefix>_epoch=N.pt`` files (as
    ``CheckpointSaver`` names them), largest N first; empty if there are none."""
    found = []
    for path in Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt"):
        number = path.stem.rsplit("=", 1)[-1]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """The path of the newest resumable checkpoint in ``ckpt_dir``: the ``<prefix>_epoch=N.pt``
    with the largest N, whether or not it loads (``mgrad_net.checkpoints.resume_checkpoint``
    picks the newest that does).

    Raises:
        FileNotFoundError: naming the folder, when it holds no such file.
    """
    found = checkpoints_newest_first(ckpt_dir, prefix)
    if not found:
        raise NoCheckpointError(
            f"nothing to resume: {ckpt_dir} holds no {prefix}_epoch=<N>.pt (the checkpoint a training run "
            "saves after each epoch); start without --resume, or point --ckpt_dir at the run's folder."
        )
    return str(found[0])


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :func:`atomic_path`: a segmentation file is
    either complete or absent, never a truncated ``.nii.gz`` that a viewer half-reads after a
    crash. Give it to ``SaveImage(d)`` as ``writer``. A full file system raises
    :class:`~mgrad_net.errors.NoSpaceLeftError` naming the folder (the temporary file removed).
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:
        name = str(filename)
        suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        with no_space_named(filename), atomic_path(filename, suffix=suffix) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:  # the file the user gets, not the temporary one MONAI's writer would name
            image_writer_logger.info(f"writing: {filename}")


def read_pretrained_state(path: str | os.PathLike) -> dict:
    """The state dict in the local weights file ``path`` (see :func:`mgrad_net.checkpoints.load_pretrained`): bare or
    under ``model`` / ``state_dict``, DistributedDataParallel's ``module.`` prefixes removed.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no state dict.
    """
    import torch

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained weights {path!r} is not a file (local weights only: nothing is downloaded).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"pretrained weights {path!r} could not be read as PyTorch weights: {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"pretrained weights {path!r} holds no state dict.")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
