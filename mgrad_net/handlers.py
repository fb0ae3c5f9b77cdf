"""Ignite handlers the bundle needs beyond MONAI's own."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import string_list_all_gather

from mgrad_net.inference import optimize_for_inference
from mgrad_net.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["SegmentationReport", "OptimizeForInference", "StopOnNonFiniteLoss"]


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
