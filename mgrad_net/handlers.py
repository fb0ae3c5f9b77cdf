"""Ignite handlers the bundle needs beyond MONAI's own."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import string_list_all_gather

from mgrad_net.inference import optimize_for_inference
from mgrad_net.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["SegmentationReport", "OptimizeForInference", "StopOnNonFiniteLoss", "TrainingLog", "read_training_log", "BestMetricRecord"]


def _finite_mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


class SegmentationReport:
    """Writes the per-case × per-class metrics of an evaluation run and their summary.

    Reads the per-case details that MONAI's metric handlers (``MeanDice``, ``HausdorffDistance``,
    ``MeanIoUHandler``, ``SurfaceDistance``, with ``save_details=True``) leave in
    ``engine.state.metric_details``, and on completion writes, atomically:

    - ``<output_dir>/metrics.csv``: one row per case and class: ``case, class, <metric>…``;
    - ``<output_dir>/summary.json``: ``{"mean": {metric: …}, "per_class": {class: {metric: …}},
      "cases": n, "nonfinite": {metric: count}}``.

    A distance is undefined (MONAI gives NaN, or inf) where the prediction or the ground truth
    lacks a class; means are taken over the finite values, and ``nonfinite`` counts the others
    per metric, so a missed structure is never silently averaged away.

    Args:
        output_dir: folder of the two files.
        class_names: names of the classes the metrics cover (background excluded if they exclude it).
        metrics: report name → engine metric name, e.g. ``{"dice": "val_mean_dice"}``.
        image_key: batch key whose metadata names each case.
    """

    def __init__(
        self, output_dir: str, class_names: Sequence[str], metrics: dict[str, str], image_key: str = "image"
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.metrics = dict(metrics)
        self.image_key = image_key
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._cases = []

    def _collect_names(self, engine: Engine) -> None:
        # MONAI engines decollate the batch into a list of per-case dicts; an undecollated one is a dict
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            meta = getattr(item.get(self.image_key), "meta", None) or {}
            names = meta.get("filename_or_obj", "?")
            names = [names] if isinstance(names, str) else list(names)
            self._cases.extend(Path(str(n)).name for n in names)

    def _write(self, engine: Engine) -> None:
        cases = string_list_all_gather(self._cases)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        details = {}
        for name, key in self.metrics.items():
            if key not in engine.state.metric_details:
                raise KeyError(f"SegmentationReport: no details for metric {key!r}; is it attached with save_details?")
            values = torch.as_tensor(engine.state.metric_details[key]).float().reshape(len(cases), -1)
            if values.shape[1] != len(self.class_names):
                raise ValueError(
                    f"metric {key!r} has {values.shape[1]} classes, but class_names lists {len(self.class_names)}."
                )
            details[name] = values.tolist()

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["case", "class", *details])
        for i, case in enumerate(cases):
            for c, cls in enumerate(self.class_names):
                writer.writerow([case, cls, *(repr(details[m][i][c]) for m in details)])
        atomic_write_text(self.output_dir / "metrics.csv", buf.getvalue())

        per_class = {
            cls: {m: _finite_mean([row[c] for row in details[m]]) for m in details}
            for c, cls in enumerate(self.class_names)
        }
        summary = {
            "mean": {m: _finite_mean([v for row in details[m] for v in row]) for m in details},
            "per_class": per_class,
            "cases": len(cases),
            "nonfinite": {m: sum(not math.isfinite(v) for row in details[m] for v in row) for m in details},
        }
        atomic_write_json(self.output_dir / "summary.json", summary)


class OptimizeForInference:
    """Turns the evaluator's network into its inference form when the run starts.

    Attach it after the ``CheckpointLoader``: both act on STARTED, in the order attached, so the
    weights are loaded before BatchNorm is folded into them. The network is changed in place
    (see :func:`mgrad_net.inference.optimize_for_inference`), so use it only in runs that do
    not train the same network afterwards.

    Args:
        network: the evaluator's network.
        fold_bn: fold BatchNorm into the preceding convolutions.
        channels_last: use the channels-last memory format.
    """

    def __init__(self, network: torch.nn.Module, fold_bn: bool = True, channels_last: bool = True) -> None:
        self.network = network
        self.fold_bn = fold_bn
        self.channels_last = channels_last

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        optimize_for_inference(self.network, fold_bn=self.fold_bn, channels_last=self.channels_last)


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
        batch = engine.state.batch
        meta = getattr(batch.get(self.image_key), "meta", None) if isinstance(batch, dict) else None
        files = (meta or {}).get("filename_or_obj", [])
        files = [files] if isinstance(files, str) else [str(f) for f in files]
        raise FloatingPointError(
            f"non-finite loss ({float(loss.float().mean())}) at iteration {engine.state.iteration}, "
            f"feedback pass {self._pass}, epoch {engine.state.epoch}; batch files: {', '.join(files) or 'unknown'}. "
            f"Training stopped before this step; the last good state is in {self.save_dir / 'last_good.pt'}."
        )


TRAINING_LOG_FIELDS = ("epoch", "iterations", "loss", "lr", "seconds", "val_mean_dice", "best_val_mean_dice")


def read_training_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a :class:`TrainingLog` CSV, oldest epoch first (empty if there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class TrainingLog:
    """One CSV row per training epoch: mean loss, learning rate, wall time, and the validation
    Dice (mean and per class) of the validation that ran at the end of that epoch.

    Attach it to the trainer *after* the ``ValidationHandler`` (handlers of one event run in the
    order attached), so the row sees that epoch's validation. The file is rewritten atomically
    each epoch; rows of epochs at or after the current one are dropped first, so a run resumed
    from an earlier checkpoint continues the log instead of duplicating epochs.

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

    def _validation(self) -> dict[str, float | str]:
        row: dict[str, float | str] = {"val_mean_dice": "", "best_val_mean_dice": ""}
        state = getattr(self.validator, "state", None)
        if state is None or self.metric_name not in state.metrics:
            return row
        row["val_mean_dice"] = float(state.metrics[self.metric_name])
        if getattr(state, "best_metric", -1) != -1:
            row["best_val_mean_dice"] = float(state.best_metric)
        details = getattr(state, "metric_details", {}).get(self.metric_name)
        if details is not None and self.class_names:
            values = torch.as_tensor(details).float().reshape(-1, len(self.class_names))
            for name, column in zip(self.class_names, values.T):
                finite = column[torch.isfinite(column)]
                row[f"val_dice_{name}"] = float(finite.mean()) if finite.numel() else float("nan")
        return row

    def _write(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        row = {
            "epoch": engine.state.epoch,
            "iterations": engine.state.iteration,
            "loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            "lr": self._lr,
            "seconds": round(time.perf_counter() - self._started, 3),
            **self._validation(),
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
    best epoch nor replaces the best weights with a worse first validation.

    Args:
        evaluator: the engine that validates and keeps ``state.best_metric``.
        saver: the ``CheckpointSaver`` that keeps the best weights (``save_key_metric=True``).
        filename: the saver's ``key_metric_filename``.
    """

    def __init__(self, evaluator: Engine, saver, filename: str = "model.pt") -> None:
        self.evaluator = evaluator
        self.saver = saver
        self.filename = filename

    def state_dict(self) -> dict[str, float | int]:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self.evaluator.state.best_metric_epoch != -1:
            # the format of ignite's Checkpoint.state_dict(): its list of (score, file) pairs
            self.saver.load_state_dict({"_saved": [(self.evaluator.state.best_metric, self.filename)]})
