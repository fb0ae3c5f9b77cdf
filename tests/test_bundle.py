"""The bundle end to end through ``python -m monai.bundle``: train → evaluate → inference on real files."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mgrad_net.checkpoints import read_records
from mgrad_net.handlers import read_training_log
from mgrad_net.networks import MGRADUNet
from tests.bundle_utils import SHARED_DATA, run_bundle

CLASSES = ["right ventricle", "myocardium", "left ventricle"]


def _assert_segmentations_match_inputs(out_dir, images, postfix="seg"):
    for image in images:
        name = image.name[: -len(".nii.gz")]
        seg_path = out_dir / f"{name}_{postfix}.nii.gz"
        assert seg_path.exists(), f"no segmentation for {image}"
        seg, img = nib.load(seg_path), nib.load(image)
        assert seg.shape == img.shape
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
        values = np.unique(np.asarray(seg.dataobj))
        assert set(values.tolist()) <= {0, 1, 2, 3}


def _assert_metrics_files(out_dir, cases):
    rows = list(csv.DictReader((out_dir / "metrics.csv").open()))
    assert len(rows) == cases * len(CLASSES)
    assert {r["class"] for r in rows} == set(CLASSES)
    assert set(rows[0]) == {"case", "class", "dice", "hd95", "iou", "asd"}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["mean"]) == {"dice", "hd95", "iou", "asd"}
    assert set(summary["per_class"]) == set(CLASSES)
    assert summary["cases"] == cases
    dice = [float(r["dice"]) for r in rows]
    assert all(0.0 <= d <= 1.0 for d in dice if np.isfinite(d))
    return summary


def _validation_dice(bundle_root) -> list[float]:
    """Validation mean Dice per validated epoch, from the run's training_log.csv."""
    return [float(r["val_mean_dice"]) for r in read_training_log(bundle_root / "eval" / "training_log.csv")]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """Train on the embedded default (written on first use), then evaluate and infer."""
    root = tmp_path_factory.mktemp("bundle")
    train = run_bundle(
        "training", ["train"], root, "--max_epochs", "2", "--train#slices_per_volume", "2", "--learning_rate", "0.003"
    )
    evaluate = run_bundle("evaluating", ["train", "evaluate"], root)
    infer = run_bundle(None, ["inference"], root, "--output_dir", str(root / "segs"))  # the id MONAI Label calls
    return root, train, evaluate, infer


def test_training_writes_synthetic_default_and_checkpoints(synthetic_run):
    root = synthetic_run[0]
    datalist = json.loads((root / "data" / "synthetic" / "dataset.json").read_text())
    assert {len(datalist[s]) for s in ("training", "validation", "test")} <= {12, 3}
    best = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    net = MGRADUNet(out_channels=4, features=(4, 8, 16, 32, 64), decoder_channels=8)
    net.load_state_dict(best)  # the best weights are a plain state dict of the configured network, and say so
    records = read_records(root / "models" / "model.pt")
    assert records["record"]["network"] == "mgrad_net.networks.mgrad_unet.MGRADUNet"
    assert records["record"]["roi_size"] == [48, 48] and records["best"]["best_metric"] >= 0
    latest = list((root / "models").glob("checkpoint*.pt"))
    assert len(latest) == 1
    state = torch.load(latest[0], map_location="cpu", weights_only=True)  # plain tensors and numbers only
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]  # two epochs done
    assert latest[0].name == "checkpoint_epoch=2.pt"


def test_evaluate_writes_per_case_metrics_and_summary(synthetic_run):
    root, _, evaluate, _ = synthetic_run
    summary = _assert_metrics_files(root / "eval", cases=3)
    assert summary["mean"]["dice"] is not None
    assert summary["distance_unit"] == "mm"  # the phantoms' NIfTI files carry their spacing


def test_inference_writes_one_segmentation_per_input_in_its_geometry(synthetic_run):
    root = synthetic_run[0]
    datalist = json.loads((root / "data" / "synthetic" / "dataset.json").read_text())
    images = [root / "data" / "synthetic" / item["image"] for item in datalist["test"]]
    _assert_segmentations_match_inputs(root / "segs", images)


def test_missing_dataset_dir_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = run_bundle("training", ["train"], tmp_path, "--dataset_dir", str(missing), "--max_epochs", "1", check=False)
    assert proc.returncode != 0
    assert f"dataset_dir {str(missing)!r} does not exist" in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists()  # no silent fall back to the synthetic default


def test_inference_refuses_to_overwrite_its_inputs(tmp_path, synthetic_run):
    root = synthetic_run[0]
    images = root / "data" / "synthetic" / "images"
    proc = run_bundle(
        "inference", ["inference"], root, "--output_dir", str(images), "--output_postfix", "", check=False
    )
    assert proc.returncode != 0
    assert "overwrite its own input" in proc.stdout + proc.stderr


ACDC = SHARED_DATA / "acdc"


@pytest.mark.skipif(not ACDC.is_dir(), reason=f"shared ACDC data not found at {ACDC}")
def test_bundle_on_four_real_acdc_cases(tmp_path):
    train = sorted((ACDC / "training").glob("patient00[3-4]_frame01.nii.gz"))
    val = sorted((ACDC / "validation").glob("patient0[01]*_frame01.nii.gz"))[:2]
    pair = lambda p: {"image": str(p), "label": str(p).replace(".nii.gz", "_gt.nii.gz")}  # noqa: E731
    datalist = {"training": [pair(p) for p in train], "validation": [pair(p) for p in val],
                "test": [{"image": str(p)} for p in val]}  # fmt: skip
    assert len(train) == 2 and len(val) == 2
    listing = tmp_path / "acdc4.json"
    listing.write_text(json.dumps(datalist))
    data = ["--dataset_dir", str(ACDC), "--datalist", str(listing)]
    run_bundle("training", ["train"], tmp_path, *data, "--max_epochs", "1", "--train#slices_per_volume", "2")
    assert (tmp_path / "models" / "model.pt").exists()
    run_bundle("evaluating", ["train", "evaluate"], tmp_path, *data)
    summary = _assert_metrics_files(tmp_path / "eval", cases=2)
    # evaluate scores the saved best weights on the validation cases: the same Dice as validation did
    history = _validation_dice(tmp_path)
    assert len(history) == 1
    assert abs(summary["mean"]["dice"] - history[0]) < 1e-3
    run_bundle("inference", ["inference"], tmp_path, *data, "--output_dir", str(tmp_path / "segs"))
    _assert_segmentations_match_inputs(tmp_path / "segs", val)


def test_finetune_starts_from_the_weights_at_ckpt_path(tmp_path, synthetic_run):
    root = synthetic_run[0]
    start = tmp_path / "start.pt"
    start.write_bytes((root / "models" / "model.pt").read_bytes())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"weights of an earlier run")
    proc = run_bundle(
        "training", ["train"], tmp_path,
        "--dataset_dir", str(root / "data" / "synthetic"), "--ckpt_path", str(start), "--finetune", "true",
        "--max_epochs", "1", "--train#slices_per_volume", "1",
    )  # fmt: skip
    assert f"fine-tuning from {start}: " in proc.stdout + proc.stderr
    assert "tensors loaded" in proc.stdout + proc.stderr and "; fresh:" not in proc.stdout + proc.stderr
    assert (tmp_path / "models" / "model.pt").read_bytes() != b"weights of an earlier run"
    kept = list((tmp_path / "models").glob("model_before_*.pt"))  # the earlier weights, kept and logged
    assert len(kept) == 1 and kept[0].read_bytes() == b"weights of an earlier run"
    assert "the previous file is kept as" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not ACDC.is_dir(), reason=f"shared ACDC data not found at {ACDC}")
def test_training_on_real_acdc_rises_well_above_chance(tmp_path):
    """One epoch of the quick variant on the 140 ACDC training volumes, two slices from each,
    validated on the 20 validation volumes (about 3 minutes here; evaluate's agreement with
    validation is checked in test_bundle_on_four_real_acdc_cases, the shipped weights' own
    evaluation in tests/test_shipped_weights.py)."""
    data = ["--dataset_dir", str(ACDC)]
    epoch = ["--max_epochs", "1", "--train#slices_per_volume", "2"]
    run_bundle("training", ["train", "quick"], tmp_path, *data, *epoch, tiny=False)
    history = _validation_dice(tmp_path)
    assert len(history) == 1
    # chance for three small structures is near 0 (0.404 measured after this epoch; 0.475 with 4 slices)
    assert history[0] > 0.35


def test_inference_writes_only_into_output_dir_whatever_the_input_path(tmp_path, synthetic_run):
    root = synthetic_run[0]
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    source = root / "data" / "synthetic" / "images" / "phantom_015.nii.gz"
    (elsewhere / "evil.nii.gz").write_bytes(source.read_bytes())
    listing = data / "dataset.json"
    listing.write_text(json.dumps({"test": [{"image": "../elsewhere/evil.nii.gz"}]}))
    out = tmp_path / "out"
    run_bundle(
        "inference", ["inference"], tmp_path, "--dataset_dir", str(data), "--datalist", str(listing),
        "--output_dir", str(out), "--ckpt_path", str(root / "models" / "model.pt"),
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["evil_seg.nii.gz"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["evil.nii.gz"]  # nothing written beside the input
