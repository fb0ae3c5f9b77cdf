"""One run per folder: an advisory ``flock`` on a lock file in the folder a run writes, which the
kernel releases when its holder dies, so a crashed run never leaves a stale lock."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from mgrad_net.errors import CheckpointError, CkptDirInUseError
from mgrad_net.io import is_atomic_leftover

__all__ = [
    "LOCK_NAME",
    "lock_folder",
    "lock_ckpt_dir",
    "lock_output_dir",
    "unlock_folder",
    "unlock_ckpt_dir",
    "unlock_output_dir",
]

logger = logging.getLogger("mgrad_net")

LOCK_NAME = ".training.lock"
_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of the process


def lock_folder(folder: str | os.PathLike, lock_name: str | None, role: str, instead: str) -> Path:
    """Take ``<folder>/<lock_name>`` (``None``: the folder itself) for this process, or refuse:
    another run writes there.

    An exclusive, non-blocking ``flock`` held until the process ends; the kernel releases it when
    the process dies however it dies, so the lock of a crashed run is never stale (a lock file
    stays, and the next run simply takes it). A lock file holds the holder's pid and host, for the
    message; a folder locked itself gets no file in it (an output folder holds the outputs alone).
    Creates ``folder``. Returns the locked path.

    Args:
        folder: the folder a run writes.
        lock_name: the lock file's name in it, or ``None`` to lock the folder itself.
        role: what the folder is to the run, for messages (``ckpt_dir``, ``output_dir``).
        instead: the option that names another folder, for the message.

    Raises:
        CheckpointError: ``folder`` (or a folder above it) is a file, or cannot be created or written.
        CkptDirInUseError: a live process holds the lock; the message names the lock (and the pid).
    """
    folder = Path(folder).expanduser()
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise CheckpointError(
                f"{role} {folder} cannot be written: {path} is a file, not a folder. "
                f"Give {instead} a folder (it is created if missing)."
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / lock_name).resolve() if lock_name else folder.resolve()
        if lock in _held:
            return lock
        if not os.access(folder, os.W_OK):
            raise OSError(errno.EROFS if _read_only(folder) else errno.EACCES, "")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644) if lock_name else os.open(lock, os.O_RDONLY)
    except OSError as err:
        reason = err.strerror or os.strerror(err.errno or 0) or str(err)
        raise CheckpointError(
            f"{role} {folder} cannot be written ({reason}): give {instead} a folder this user can write."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() if lock_name else ""
        os.close(fd)
        raise CkptDirInUseError(
            f"{role} {folder} is in use by another run ({holder or 'a live process'}), which holds the lock {lock}. "
            f"Wait for it to end, or give this run another {instead}."
        ) from None
    if lock_name:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    _held[lock] = fd
    return lock


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def lock_ckpt_dir(ckpt_dir: str | os.PathLike) -> Path:
    """One training run per ``ckpt_dir``: :func:`lock_folder` on ``<ckpt_dir>/.training.lock``.
    With the lock held, the hidden temporary files that a killed save left are removed.

    Raises:
        CheckpointError: ``ckpt_dir`` (or a folder above it) is a file, or cannot be written.
        CkptDirInUseError: another live training run holds it.
    """
    lock = lock_folder(ckpt_dir, LOCK_NAME, "ckpt_dir", "--ckpt_dir")
    for leftover in lock.parent.iterdir():
        if leftover.is_file() and is_atomic_leftover(leftover):
            leftover.unlink(missing_ok=True)
            logger.info("removed %s, the temporary file of a save that did not complete", leftover)
    return lock


def lock_output_dir(output_dir: str | os.PathLike) -> Path:
    """One run writing ``output_dir`` at a time (inference, evaluation, a training's log):
    :func:`lock_folder` on the folder itself (no file in it), so two runs never interleave their files.

    Raises:
        CheckpointError: ``output_dir`` (or a folder above it) is a file, or cannot be written.
        CkptDirInUseError: another live run writes there.
    """
    return lock_folder(output_dir, None, "output_dir", "--output_dir")


def unlock_folder(folder: str | os.PathLike, lock_name: str | None = LOCK_NAME) -> None:
    """Release this process's lock on ``folder`` (it is released at exit anyway)."""
    folder = Path(folder).expanduser()
    fd = _held.pop((folder / lock_name).resolve() if lock_name else folder.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file releases the flock


def unlock_ckpt_dir(ckpt_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``ckpt_dir``."""
    unlock_folder(ckpt_dir, LOCK_NAME)


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``output_dir``."""
    unlock_folder(output_dir, None)
