"""The evaluator's handlers: the per-case report of an evaluation run, and the network's inference form."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.utils import string_list_all_gather

from mgrad_net.handlers.utils import case_files, finite_mean, is_main_process
from mgrad_net.inference import optimize_for_inference
from mgrad_net.io import atomic_write_json, atomic_write_text
from mgrad_net.metrics import case_affines, distance_unit

__all__ = ["SegmentationReport", "OptimizeForInference"]


def _case_names(files: Sequence[str]) -> list[str]:
    """Each case's name in the report: its file name, or, where two cases share one (``site1/a.nii.gz``
    and ``site2/a.nii.gz``), every case's path below the folder they all share, so no two rows are one case."""
    names = [Path(f).name for f in files]
    if len(set(names)) == len(names) or "?" in files:
        return names
    root = os.path.commonpath([os.path.abspath(f) for f in files])
    return [os.path.relpath(os.path.abspath(f), root) for f in files]


class SegmentationReport:
    """Writes the per-case × per-class metrics of an evaluation run and their summary.

        Reads the per-case details that MONAI's metric handlers (``MeanDice``, ``HausdorffDistance``,
        ``MeanIoUHandler``, ``SurfaceDistance``, with ``save_details=True``) leave in
        ``engine.state.metric_details``, and on completion writes, atomically:

        - ``<output_dir>/metrics.csv``: one row per case and class: ``case, class, <metric>…``;
        - ``<output_dir>/summary.json``: ``{"mean": {metric: …}, "per_class": {class: {metric: …}},
          "cases": n, "nonfinite": {metric: count}, "distance_unit": …}``.

    ``distance_unit`` is the unit of the distance metrics (HD95, ASD): ``"mm"`` where every case's
    label carries its voxel spacing (:mod:`mgrad_net.metrics` then measures in millimetres),
    ``"voxels"`` where none does (an identity affine: the spacing was lost), and ``"mixed"``, with
    ``distance_unit_cases`` counting each, where the cases disagree.

        A distance is undefined (MONAI gives NaN, or inf) where the prediction or the ground truth
        lacks a class; means are taken over the finite values, and ``nonfinite`` counts the others
        per metric, so a missed structure is never silently averaged away. In a distributed run the
        case names are gathered from every rank and rank 0 writes.

        Args:
            output_dir: folder of the two files.
            class_names: names of the classes the metrics cover (background excluded if they exclude it).
            metrics: report name → engine metric name, e.g. ``{"dice": "val_mean_dice"}``.
            image_key: batch key whose metadata names each case.
            label_key: batch key whose affine gives each case's distance unit.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        metrics: dict[str, str],
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.metrics = dict(metrics)
        self.image_key = image_key
        self.label_key = label_key
        self._cases: list[str] = []
        self._units: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._cases, self._units = [], []

    def _collect_names(self, engine: Engine) -> None:
        batch = engine.state.batch
        files = case_files(batch, self.image_key)
        self._cases.extend(files)
        units = []
        for item in batch if isinstance(batch, list) else [batch]:
            label = item.get(self.label_key) if isinstance(item, dict) else None
            if isinstance(batch, list) and isinstance(label, MetaTensor):
                label = label.unsqueeze(0)  # a decollated case: give it its batch dimension back
            units.extend(distance_unit(a) for a in case_affines(label) or [])
        self._units.extend(units if len(units) == len(files) else [distance_unit(None)] * len(files))

    def _write(self, engine: Engine) -> None:
        cases = _case_names(string_list_all_gather(self._cases))  # every rank takes part in the gather
        units = string_list_all_gather(self._units)
        if not is_main_process():
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
            cls: {m: finite_mean([row[c] for row in details[m]]) for m in details}
            for c, cls in enumerate(self.class_names)
        }
        summary = {
            "mean": {m: finite_mean([v for row in details[m] for v in row]) for m in details},
            "per_class": per_class,
            "cases": len(cases),
            "nonfinite": {m: sum(not math.isfinite(v) for row in details[m] for v in row) for m in details},
            "distance_unit": units[0] if len(set(units)) == 1 else "mixed",
        }
        if len(set(units)) > 1:
            summary["distance_unit_cases"] = {u: units.count(u) for u in sorted(set(units))}
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
