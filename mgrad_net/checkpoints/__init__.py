"""Training checkpoints: saving, locking, loading, resuming, and what a checkpoint says it holds.

- :mod:`.saving`: :class:`AtomicCheckpointSaver`, MONAI's ``CheckpointSaver`` writing every file
  atomically and deleting the one it replaces only after the new one is complete.
- :mod:`.locks`: :func:`lock_ckpt_dir`, :func:`lock_output_dir`: one run per ``ckpt_dir`` and per
  ``output_dir``.
- :mod:`.loading`: :func:`load_checkpoint`, :func:`check_weights`: a file loaded safely
  (``weights_only``) and matched against the network before a run starts;
  :func:`load_pretrained`: local weights into a network's ``load_from``.
- :mod:`.runs`: :func:`resume_checkpoint`, :func:`earlier_run`: ``--resume`` continues the run
  it finds; a new run never starts over an unfinished one.
- :mod:`.record`: :class:`RunRecord`, saved in ``model.pt``: the network and its arguments, the
  sizes and classes, the command and the commit that trained it.
- :mod:`.describe`: :func:`recorded`, :func:`recorded_network`: inference and evaluation read that
  record, so weights of other widths or sizes run with ``--ckpt_path`` alone.
"""

from mgrad_net.checkpoints.describe import network_from_record, recorded, recorded_network, run_record
from mgrad_net.checkpoints.loading import check_weights, load_checkpoint, load_pretrained
from mgrad_net.checkpoints.locks import (
    LOCK_NAME,
    lock_ckpt_dir,
    lock_folder,
    lock_output_dir,
    unlock_ckpt_dir,
    unlock_folder,
    unlock_output_dir,
)
from mgrad_net.checkpoints.record import RunRecord
from mgrad_net.checkpoints.runs import earlier_run, resume_checkpoint
from mgrad_net.checkpoints.saving import AtomicCheckpointSaver, AtomicDiskSaver, read_records, with_records

__all__ = [
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "LOCK_NAME",
    "lock_folder",
    "lock_ckpt_dir",
    "lock_output_dir",
    "unlock_folder",
    "unlock_ckpt_dir",
    "unlock_output_dir",
    "load_checkpoint",
    "load_pretrained",
    "check_weights",
    "resume_checkpoint",
    "earlier_run",
    "RunRecord",
    "run_record",
    "recorded",
    "recorded_network",
    "network_from_record",
    "read_records",
    "with_records",
]
