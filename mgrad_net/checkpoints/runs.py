"""Which run a ``ckpt_dir``'s resumable checkpoints belong to: the one ``--resume`` continues, and
the earlier one a new run may replace."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from mgrad_net.checkpoints.loading import load_checkpoint, mismatch
from mgrad_net.errors import CheckpointError
from mgrad_net.io import checkpoints_newest_first, latest_checkpoint

__all__ = ["earlier_run", "resume_checkpoint"]

logger = logging.getLogger("mgrad_net")


def earlier_run(ckpt_dir: str | os.PathLike, discard_unfinished: bool = False) -> list[Path]:
    """The resumable checkpoints an earlier run left in ``ckpt_dir``, which a new run (not
    ``--resume``) there will delete once it has saved its own first one: two runs' checkpoints in
    one folder would let a later ``--resume`` continue the wrong one. Checked before anything is
    written.

    Raises:
        CheckpointError: the newest of them is an unfinished run (its trainer stopped before its
            last epoch: killed, or stopped by hand), which a new run would end; naming the file
            and the two ways on (``--resume true``, or moving it away). ``discard_unfinished``
            lets the new run replace it (the MONAI Label app, whose stopped trainings are not resumed).
    """
    found = checkpoints_newest_first(ckpt_dir)
    if not found:
        return []
    newest = found[0]
    try:
        state = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
        trainer = state.get("trainer", {}) if isinstance(state, dict) else {}
        epoch = int(trainer.get("epoch") or trainer["iteration"] // trainer["epoch_length"])
        last = int(trainer["max_epochs"])
        budget = state.get("budget") or {}
        seconds = float(budget.get("seconds", 0))  # 0: no budget
        spent = seconds > 0 and float(budget.get("spent", 0)) >= seconds
    except Exception:  # unreadable: a killed save or a foreign file; resume would skip it as well
        epoch, last, spent = 0, 1, False
    if epoch < last and not spent and not discard_unfinished:
        raise CheckpointError(
            f"ckpt_dir {Path(ckpt_dir)} holds {newest.name}, an unfinished training run (epoch {epoch} of {last}): "
            "continue it with --resume true, or move it out of that folder (or give --ckpt_dir another "
            "folder) to start a new run; a new run here would leave two runs' checkpoints for --resume to mix."
        )
    logger.warning(
        "%s: the resumable checkpoint(s) of an earlier run (%s) will be deleted once this run has saved its own",
        ckpt_dir, ", ".join(p.name for p in found))  # fmt: skip
    return found


def resume_checkpoint(ckpt_dir: str | os.PathLike, network: torch.nn.Module | None = None) -> str:
    """The newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` that loads, for ``--resume``.

    A newer one that is empty, truncated or unreadable (a kill or a full disk while it was written
    by an older version of this bundle, or a copy gone wrong) is skipped with a warning naming it
    and why. One that loads but holds another architecture than ``network`` stops the run, as in
    :func:`check_weights`: that is the configuration's fault, not the file's.

    Raises:
        NoCheckpointError: ``ckpt_dir`` holds no checkpoint (naming the folder).
        CheckpointError: none of them loads (each named, with why), or the newest that loads does
            not fit ``network``.
    """
    candidates = checkpoints_newest_first(ckpt_dir)
    if not candidates:
        latest_checkpoint(ckpt_dir)  # raises, naming the folder
    skipped: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if not isinstance(state.get("model"), Mapping):
                raise CheckpointError(f"checkpoint {path} holds no 'model' entry: not a resumable training state.")
        except CheckpointError as err:
            skipped.append(str(err))
            logger.warning("--resume skips %s", err)
            continue
        if network is not None:
            problem = mismatch(path, state["model"], network)
            if problem:
                raise CheckpointError(problem)
        if skipped:
            logger.warning("--resume continues from %s, the newest checkpoint that loads", path)
        return str(path)
    raise CheckpointError(f"nothing to resume in {ckpt_dir}: no checkpoint loads ({' '.join(skipped)})")
