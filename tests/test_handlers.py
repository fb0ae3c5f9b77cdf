"""SegmentationReport on a real MONAI evaluator with MONAI's metric handlers."""

from __future__ import annotations

import csv
import json
import math

import torch
from monai.data import DataLoader
from monai.data.meta_tensor import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import HausdorffDistance, MeanDice, from_engine
from monai.transforms import AsDiscreted, Compose

from mgrad_net.handlers import SegmentationReport


class _Background(torch.nn.Module):
    """Predicts class 0 everywhere except class 1 in the left half: one class found, one missed."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 0] = 1.0
        logits[:, 1, :, : x.shape[3] // 2] = 2.0
        return logits


def test_report_writes_rows_per_case_and_class_and_counts_undefined_values(tmp_path):
    label = torch.zeros(1, 16, 16)
    label[:, 2:6, 2:6] = 1  # found
    label[:, 10:14, 10:14] = 2  # missed: Dice 0, HD95 undefined
    cases = [
        {"image": MetaTensor(torch.zeros(1, 16, 16), meta={"filename_or_obj": f"/data/case{i}.nii.gz"}), "label": label}
        for i in range(2)
    ]
    pl = from_engine(["pred", "label"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(cases, batch_size=2),
        network=_Background(),
        postprocessing=Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=3), AsDiscreted(keys="label", to_onehot=3)]),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=pl)},
        additional_metrics={"hd95": HausdorffDistance(include_background=False, percentile=95, output_transform=pl)},
        val_handlers=[SegmentationReport(str(tmp_path), ["fat", "liver"], {"dice": "dice", "hd95": "hd95"})],
    )
    evaluator.run()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["case"], r["class"]) for r in rows] == [
        ("case0.nii.gz", "fat"), ("case0.nii.gz", "liver"), ("case1.nii.gz", "fat"), ("case1.nii.gz", "liver"),
    ]  # fmt: skip
    fat = [r for r in rows if r["class"] == "fat"]
    assert all(0.0 < float(r["dice"]) < 1.0 for r in fat)  # half the square predicted
    liver = [r for r in rows if r["class"] == "liver"]
    assert all(float(r["dice"]) == 0.0 and not math.isfinite(float(r["hd95"])) for r in liver)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cases"] == 2
    assert summary["nonfinite"] == {"dice": 0, "hd95": 2}
    assert summary["per_class"]["liver"]["hd95"] is None
    assert math.isclose(summary["mean"]["dice"], sum(float(r["dice"]) for r in rows) / 4)
