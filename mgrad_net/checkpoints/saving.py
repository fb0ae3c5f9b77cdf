"""Checkpoint files written whole or not at all.

MONAI's ``CheckpointSaver`` passes ``atomic=False`` to Ignite's ``DiskSaver`` (for the file mode
of ``tempfile``), and Ignite's ``Checkpoint`` removes the old file *before* it saves the new one:
a kill or a full disk mid-save left a truncated ``checkpoint_epoch=N.pt`` and no previous one, or
no ``model.pt`` at all. Here every file goes through a temporary file in the same folder and a
rename, and the file it replaces is deleted only after the new one is complete.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from mgrad_net.io import atomic_path, no_space_named

__all__ = ["AtomicDiskSaver", "AtomicCheckpointSaver", "with_records", "read_records", "RECORDS_KEY"]


RECORDS_KEY = "mgrad_net"


def with_records(checkpoint: Any, records: Mapping[str, Any]) -> Any:
    """``checkpoint`` with ``records`` (name -> object with ``state_dict()``) in its metadata, where
    it is a single state dict (a module's ``state_dict()``, as the best-weights file is): under
    ``_metadata["mgrad_net"]``, PyTorch's own metadata slot of a state dict, which ``torch.load``
    keeps (``weights_only`` included) and ``load_state_dict`` ignores. So ``model.pt`` stays the
    plain state dict that MONAI's ``ckpt_export``, ``CheckpointLoader``, ``monai.bundle.load`` and
    MONAI Label load, and still says what it holds. A dict of several objects is left as it is."""
    metadata = getattr(checkpoint, "_metadata", None)
    if not records or metadata is None:
        return checkpoint
    metadata[RECORDS_KEY] = {name: obj.state_dict() for name, obj in records.items()}
    return checkpoint


def read_records(path: str | os.PathLike) -> dict[str, Any]:
    """The records a saved state dict carries (``{"record": ..., "best": ...}``); empty if none."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict((getattr(state, "_metadata", None) or {}).get(RECORDS_KEY) or {})


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler: ``torch.save`` to a hidden temporary file beside the target, flushed
    to disk, then renamed into place; the files Ignite asks to remove are removed after that.

    Ignite's ``Checkpoint`` calls :meth:`remove` for the file being replaced before it calls the
    handler for the new one, so removals wait here until the next save has completed. The file
    mode follows the umask (``tempfile``'s 0600 is why MONAI turned Ignite's atomic writes off).

    Args:
        dirname: folder of the files.
        filename: a fixed file name for every save (``model.pt``), as MONAI's key-metric saver uses.
        save_on_rank: the rank that writes in a distributed run, as Ignite's ``DiskSaver``.
        records: name -> object with ``state_dict()``, written into a saved state dict's metadata.
    """

    def __init__(
        self,
        dirname: str | os.PathLike,
        filename: str | None = None,
        save_on_rank: int = 0,
        records: Mapping[str, Any] | None = None,
    ) -> None:
        self.dirname = Path(dirname).expanduser()
        self.filename = filename
        self.save_on_rank = save_on_rank
        self.records = records if records is not None else {}
        self._pending: list[Path] = []

    def _writes(self) -> bool:
        import ignite.distributed as idist

        return idist.get_rank() == self.save_on_rank

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self.dirname / (self.filename or filename)
        if self._writes():
            # serialized in memory first: a full disk then fails in a plain write, with its errno
            # (torch.save into a file reports it as a RuntimeError without one), and is named
            buffer = io.BytesIO()
            torch.save(with_records(checkpoint, self.records), buffer)
            with no_space_named(path), atomic_path(path, fsync=True) as tmp:
                tmp.write_bytes(buffer.getbuffer())
            for old in self._pending:
                if old != path:  # a fixed name was just replaced by the rename itself
                    old.unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        if self._writes():
            self._pending.append(self.dirname / (self.filename or filename))

    def remove_after_next_save(self, paths: list[Path]) -> None:
        if self._writes():
            self._pending.extend(paths)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments, same file names) saving through
    :class:`AtomicDiskSaver`: a checkpoint file is complete or absent, and the one it replaces is
    deleted only after it is complete. ``records`` (name -> object with ``state_dict()``: the
    run's :class:`~mgrad_net.checkpoints.RunRecord`, the best-metric record) ride in the metadata
    of a saved state dict (:func:`with_records`)."""

    def __init__(self, save_dir: str, save_dict: dict, records: dict | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        self.records = dict(records or {})
        # MONAI builds one Ignite Checkpoint per kind of saving, each with its own handler class
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed, records=self.records)

    def save_now(self, path: str | os.PathLike) -> None:
        """Save ``save_dict`` to ``path`` now, atomically and as its checkpoints are saved (one
        object: its bare state dict, with the records)."""
        state = {name: getattr(obj, "module", obj).state_dict() for name, obj in self.save_dict.items()}
        state = next(iter(state.values())) if len(state) == 1 else state
        buffer = io.BytesIO()
        torch.save(with_records(state, self.records), buffer)
        with no_space_named(path), atomic_path(path, fsync=True) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def supersede(self, paths: list[Path]) -> None:
        """Delete ``paths`` once this saver's next resumable checkpoint is complete: the file a
        resumed run started from, or an earlier finished run's, so that one run's state is left
        in the folder and no older checkpoint piles up."""
        if self._interval_checkpoint is not None:
            handler = self._interval_checkpoint.save_handler
            handler.remove_after_next_save([Path(p) for p in paths])
