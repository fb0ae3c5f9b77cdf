"""SegmentationReport, OptimizeForInference and StopOnNonFiniteLoss on real MONAI engines.

TrainingLog and BestMetricRecord: ``tests/test_training_records.py``.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.data.meta_tensor import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader, HausdorffDistance, MeanDice, from_engine
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose

from mgrad_net.handlers import OptimizeForInference, SegmentationReport, StopOnNonFiniteLoss
from tests.conftest import tiny_net


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
        postprocessing=Compose(
            [AsDiscreted(keys="pred", argmax=True, to_onehot=3), AsDiscreted(keys="label", to_onehot=3)]
        ),
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
    assert summary["distance_unit"] == "voxels"  # labels without an affine
    assert summary["per_class"]["liver"]["hd95"] is None
    assert math.isclose(summary["mean"]["dice"], sum(float(r["dice"]) for r in rows) / 4)


def _dice_evaluator(cases: list[dict], handlers, key_val_metric: dict | None = None) -> SupervisedEvaluator:
    """An evaluator of ``_Background`` over ``cases`` (batches of 2), scoring Dice unless told otherwise."""
    pl = from_engine(["pred", "label"])
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(cases, batch_size=2),
        network=_Background(),
        postprocessing=Compose(
            [AsDiscreted(keys="pred", argmax=True, to_onehot=3), AsDiscreted(keys="label", to_onehot=3)]
        ),
        key_val_metric=key_val_metric or {"dice": MeanDice(include_background=False, output_transform=pl)},
        val_handlers=handlers,
    )


def test_report_names_cases_without_file_metadata_one_row_each(tmp_path):
    label = torch.zeros(1, 16, 16)
    label[:, 2:6, 2:6] = 1
    cases = [{"image": torch.zeros(1, 16, 16), "label": label} for _ in range(3)]  # plain tensors: no metadata
    _dice_evaluator(cases, [SegmentationReport(str(tmp_path), ["fat", "liver"], {"dice": "dice"})]).run()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["case"], r["class"]) for r in rows] == [("?", "fat"), ("?", "liver")] * 3
    assert json.loads((tmp_path / "summary.json").read_text())["cases"] == 3


def test_optimize_for_inference_after_the_loader_folds_the_loaded_weights(tmp_path):
    trained = tiny_net(out_channels=2)
    trained.train()
    trained(torch.randn(4, 1, 32, 32))  # BatchNorm running statistics away from their initial values
    torch.save({"model": trained.state_dict()}, tmp_path / "model.pt")
    images = [{"image": torch.randn(1, 32, 32), "label": torch.zeros(1, 32, 32)} for _ in range(2)]
    with torch.no_grad():
        expected = trained.eval()(torch.stack([c["image"] for c in images]))

    network = tiny_net(out_channels=2)  # other initial weights: the loaded ones must be used
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(images, batch_size=2),
        network=network,
        decollate=False,
        val_handlers=[CheckpointLoader(str(tmp_path / "model.pt"), {"model": network}), OptimizeForInference(network)],
    )
    preds = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output["pred"]))
    evaluator.run()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in network.parameters() if p.dim() == 4)
    torch.testing.assert_close(torch.as_tensor(preds[0]), expected, rtol=1e-4, atol=1e-4)


def test_stop_on_non_finite_loss_names_unnamed_cases_of_a_collated_batch(tmp_path):
    items = [{"image": torch.rand(1, 8, 8), "label": torch.randint(0, 2, (1, 8, 8))} for _ in range(2)]
    items[1]["image"][0, 0, 0] = float("nan")
    net = torch.nn.Conv2d(1, 2, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(items, batch_size=2),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=[StopOnNonFiniteLoss(str(tmp_path), {"model": net})],
    )
    with pytest.raises(FloatingPointError, match=r"batch files: \?, \?\. "):
        trainer.run()
    assert (tmp_path / "last_good.pt").is_file()


def test_report_names_the_distance_unit_of_its_cases(tmp_path):
    """A case whose label carries its spacing is measured in mm (here 2 mm pixels: twice the
    voxel distance), one with an identity affine in voxels; the summary says the units differ."""
    from monai.handlers import IgniteMetricHandler

    from mgrad_net.metrics import HausdorffDistanceMetric

    label = torch.zeros(1, 16, 16)
    label[:, 2:6, 2:6] = 1
    cases = [
        {
            "image": MetaTensor(torch.zeros(1, 16, 16), meta={"filename_or_obj": f"/data/case{i}.nii.gz"}),
            "label": MetaTensor(label.clone(), affine=torch.diag(torch.tensor([s, s, 1.0, 1.0]))),
        }
        for i, s in enumerate((2.0, 1.0))
    ]
    hd = IgniteMetricHandler(
        metric_fn=HausdorffDistanceMetric(include_background=False), output_transform=from_engine(["pred", "label"])
    )
    report = SegmentationReport(str(tmp_path), ["fat", "liver"], {"hd": "hd"})
    _dice_evaluator(cases, [report], key_val_metric={"hd": hd}).run()
    fat = [float(r["hd"]) for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r["class"] == "fat"]
    assert fat[1] > 0 and math.isclose(fat[0], 2 * fat[1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distance_unit"] == "mixed" and summary["distance_unit_cases"] == {"mm": 1, "voxels": 1}
