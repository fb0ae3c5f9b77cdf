"""The trainer's handlers: stopping at a non-finite loss with the last good state kept, the
per-epoch training log, and the record of the best validation epoch."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver

from mgrad_net.errors import NonFiniteLossError
from mgrad_net.handlers.utils import case_files, finite_mean, is_main_process
from mgrad_net.io import atomic_path, atomic_write_text

__all__ = [
    "StopOnNonFiniteLoss",
    "TRAINING_LOG_FIELDS",
    "read_training_log",
    "TrainingLog",
    "BestMetricRecord",
    "WeightsWithoutValidation",
]


class StopOnNonFiniteLoss:
    """Stops training at the first NaN or infinite loss, before it reaches the weights.

    Checks the loss as soon as it is computed (``IterationEvents.LOSS_COMPLETED``, before the
    backward pass and the optimizer step of that pass), so parameters and optimizer still hold
    the last good state. BatchNorm's running statistics were already updated by the bad forward,
    so modules' buffers are kept from just before each forward (they are small) and restored in
    the saved state. The state goes to ``<save_dir>/last_good.pt`` (atomically), and the run ends
    with a ``FloatingPointError`` naming the iteration, the feedback pass and the batch's files.

    Args:
        save_dir: folder of ``last_good.pt``.
        save_dict: name → object with ``state_dict()`` (network, optimizer, ...).
        image_key: batch key whose metadata names the batch's files.
    """

    def __init__(self, save_dir: str, save_dict: dict, image_key: str = "image") -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = {name: getattr(obj, "module", obj) for name, obj in save_dict.items()}  # unwrap DDP
        self.image_key = image_key
        self._pass = 0
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._new_batch)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._keep_buffers)  # before the next pass
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def _new_batch(self, engine: Engine) -> None:
        self._pass = 0
        self._keep_buffers(engine)

    def _keep_buffers(self, engine: Engine) -> None:
        self._buffers = {
            name: {b: t.detach().clone() for b, t in obj.named_buffers()}
            for name, obj in self.save_dict.items()
            if isinstance(obj, torch.nn.Module)
        }

    def __call__(self, engine: Engine) -> None:
        self._pass += 1
        loss = torch.as_tensor(engine.state.output["loss"]).detach()
        if bool(torch.isfinite(loss).all()):
            return
        state = {}
        for name, obj in self.save_dict.items():
            state[name] = obj.state_dict()
            if name in self._buffers:
                state[name] = {**state[name], **self._buffers[name]}
        with atomic_path(self.save_dir / "last_good.pt") as tmp:
            torch.save(state, tmp)
        files = case_files(engine.state.batch, self.image_key)
        raise NonFiniteLossError(
            f"non-finite loss ({float(loss.float().mean())}) at iteration {engine.state.iteration}, "
            f"feedback pass {self._pass}, epoch {engine.state.epoch}; batch files: {', '.join(files)}. "
            f"Training stopped before this step; the last good state is in {self.save_dir / 'last_good.pt'}."
        )


TRAINING_LOG_FIELDS = (
    "epoch",
    "iterations",
    "loss",
    "lr",
    "seconds",
    "train_seconds",
    "val_mean_dice",
    "best_val_mean_dice",
)


def read_training_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a :class:`TrainingLog` CSV, oldest epoch first (empty if there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class TrainingLog:
    """One CSV row per training epoch: mean loss, learning rate, wall time, and the validation
    Dice (mean and per class) of the validation that ran at the end of that epoch. ``seconds``
    is the epoch's wall time with its validation, ``train_seconds`` without it.

    Attach it to the trainer *after* the ``ValidationHandler`` (handlers of one event run in the
    order attached), so the row sees that epoch's validation; an epoch without one (a validation
    interval over 1) leaves the validation columns empty. A class's Dice is its mean over the
    cases where it is defined (MONAI gives NaN where the ground truth lacks the class). The file
    is rewritten atomically each epoch; rows of epochs at or after the current one are dropped
    first, so a run resumed from an earlier checkpoint continues the log instead of duplicating
    epochs. In a distributed run only rank 0 writes.

    Args:
        path: the CSV file.
        validator: the evaluator whose key metric (and its per-case details) the row reports.
        class_names: names of the classes the key metric covers, for the per-class columns.
        metric_name: the evaluator's key metric.
        optimizer: the learning rate of its first parameter group, as the epoch started, is logged.
    """

    def __init__(
        self,
        path: str,
        validator: Engine | None = None,
        class_names: Sequence[str] = (),
        metric_name: str = "val_mean_dice",
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.path = Path(path)
        self.validator = validator
        self.class_names = list(class_names)
        self.metric_name = metric_name
        self.optimizer = optimizer
        self._losses: list[float] = []
        self._started = 0.0
        self._lr: float | str = ""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self._losses = []
        self._started = time.perf_counter()
        self._lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else ""

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, list):  # decollated: every item carries the batch's loss
            output = output[0] if output else None
        loss = output.get("loss") if isinstance(output, dict) else output
        if loss is not None:
            self._losses.append(float(torch.as_tensor(loss).detach().float().mean()))

    def _validation(self, epoch: int) -> dict[str, float | str]:
        """The validation columns of ``epoch``'s row; empty if no validation ran at its end."""
        row: dict[str, float | str] = {"val_mean_dice": "", "best_val_mean_dice": ""}
        state = getattr(self.validator, "state", None)
        # a validator keeps its last metrics between runs; MONAI's Evaluator.run(epoch) ends at
        # state.epoch == epoch, so an older epoch there means this epoch was not validated
        if state is None or state.epoch != epoch or self.metric_name not in state.metrics:
            return row
        row["val_mean_dice"] = float(state.metrics[self.metric_name])
        if getattr(state, "best_metric", -1) != -1:
            row["best_val_mean_dice"] = float(state.best_metric)
        details = getattr(state, "metric_details", {}).get(self.metric_name)
        if details is not None and self.class_names:
            values = torch.as_tensor(details).float().reshape(-1, len(self.class_names))
            for name, column in zip(self.class_names, values.T):
                mean = finite_mean(column.tolist())  # a class absent from a case's ground truth: NaN there
                row[f"val_dice_{name}"] = mean if mean is not None else float("nan")
        return row

    def _write(self, engine: Engine) -> None:
        if not is_main_process():
            return
        row = {
            "epoch": engine.state.epoch,
            "iterations": engine.state.iteration,
            "loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            "lr": self._lr,
            "seconds": round(time.perf_counter() - self._started, 3),
            # ignite's time of the epoch's iterations alone: the comparison protocol's training time
            "train_seconds": round(engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0, 3),
            **self._validation(engine.state.epoch),
        }
        rows = [r for r in read_training_log(self.path) if int(r["epoch"]) < engine.state.epoch]
        fields = list(TRAINING_LOG_FIELDS) + [f"val_dice_{n}" for n in self.class_names]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*rows, row])
        atomic_write_text(self.path, buf.getvalue())


class BestMetricRecord:
    """The best-validation record of a run, as one checkpointable object.

    Put it in the resumable checkpoint's ``save_dict``: it saves the evaluator's ``best_metric``
    and ``best_metric_epoch``, and on loading restores them and tells the key-metric
    ``CheckpointSaver`` which score its ``model.pt`` holds, so a resumed run neither forgets its
    best epoch nor replaces the best weights with a worse first validation. The record is that
    file's: if the file is gone when the run resumes, nothing is restored (with a warning), and
    the next validation writes it. Saved in ``model.pt``'s records as well (``best``, with an
    :class:`~mgrad_net.checkpoints.AtomicCheckpointSaver`): weights written after the resumed
    checkpoint (a kill between an epoch's two saves) keep their better record.

    Args:
        evaluator: the engine that validates and keeps ``state.best_metric``.
        saver: the ``CheckpointSaver`` that keeps the best weights (``save_key_metric=True``).
        filename: the saver's ``key_metric_filename``.
    """

    def __init__(self, evaluator: Engine, saver: CheckpointSaver, filename: str = "model.pt") -> None:
        self.evaluator = evaluator
        self.saver = saver
        self.filename = filename
        self.resumed_from: Path | None = None  # the checkpoint a resumed run loads, set by run_training
        if isinstance(
            getattr(saver, "records", None), dict
        ):  # saved with the best weights: the score they were kept for
            saver.records.setdefault("best", self)

    def state_dict(self) -> dict[str, float | int]:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def _own_record(self, weights: Path) -> tuple[float, int] | None:
        """The record ``weights`` was saved with (``model.pt`` holds it as ``best``), if that file
        was written after the checkpoint the run resumes from: a kill between the two saves of an
        epoch (best weights, then the epoch's checkpoint) leaves weights newer than the record."""
        if self.resumed_from is None or not self.resumed_from.is_file():
            return None
        if weights.stat().st_mtime_ns < self.resumed_from.stat().st_mtime_ns:
            return None  # older than the checkpoint: its record is the checkpoint's (or an earlier run's)
        from mgrad_net.checkpoints.saving import read_records

        try:
            own = read_records(weights)["best"]
            return float(own["best_metric"]), int(own["best_metric_epoch"])
        except Exception:  # weights saved without a record (before 0.10), or not a dict
            return None

    def load_state_dict(self, state_dict: dict) -> None:
        best, epoch = float(state_dict["best_metric"]), int(state_dict["best_metric_epoch"])
        weights = Path(self.saver.save_dir) / self.filename
        own = self._own_record(weights) if weights.is_file() else None
        if own is not None and own[1] > epoch and own[0] > best:
            logging.getLogger("mgrad_net").warning(
                "%s (validation %.4f, epoch %d) was saved after the checkpoint the run resumes from (%.4f, epoch %d): "
                "it stays the best record", weights, own[0], own[1], best, epoch)  # fmt: skip
            best, epoch = own
        if epoch == -1:
            return  # saved before any validation: nothing to restore
        if not weights.is_file():
            # the saver would delete the file before writing a better one, and fail
            logging.getLogger("mgrad_net").warning(
                "%s (validation %.4f, epoch %d) is gone: the best-metric record starts afresh", weights, best, epoch
            )
            return
        self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = best, epoch
        # the format of ignite's Checkpoint.state_dict(): its list of (score, file) pairs
        self.saver.load_state_dict({"_saved": [(best, self.filename)]})


class WeightsWithoutValidation:
    """Where a run has no validation cases (MONAI Label's ``val_split 0``, a datalist without a
    validation section), no epoch is ever the best and the best-weights saver never writes: then
    each epoch's weights are saved as its file instead (atomically, with the same entries), and
    the run says so as it starts. With validation cases it does nothing.

    Args:
        validator: the evaluator whose data loader is checked.
        saver: the best-weights :class:`~mgrad_net.checkpoints.AtomicCheckpointSaver` (its ``save_now``).
        filename: the saver's ``key_metric_filename``.
    """

    def __init__(self, validator: Engine, saver: Any, filename: str = "model.pt") -> None:
        self.validator = validator
        self.saver = saver
        self.path = Path(saver.save_dir) / filename
        self._unvalidated = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _check(self, engine: Engine) -> None:
        loader = getattr(self.validator, "data_loader", None)
        self._unvalidated = loader is not None and len(loader) == 0
        if self._unvalidated and is_main_process():
            logging.getLogger("mgrad_net").warning(
                "no validation cases: %s will hold the last epoch's weights, not the best epoch's", self.path
            )

    def _save(self, engine: Engine) -> None:
        if not self._unvalidated or not is_main_process():
            return
        self.saver.save_now(self.path)
