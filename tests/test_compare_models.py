"""scripts/compare_models.py: the training columns, from training logs written by the bundle's own
TrainingLog format (minutes over stages, minutes to first reach a validation Dice); the networks'
sizes as the bundle builds them; and each row scored with its own checkpoint."""

from __future__ import annotations

import csv
import sys

import pytest

from tests.bundle_utils import REPO

sys.path.insert(0, str(REPO / "scripts"))
from compare_models import BUNDLE, ROWS, evaluate, minutes_to, row_names, training_minutes  # noqa: E402


def _log(path, rows, fields):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_minutes_add_up_over_stages_validation_excluded_where_logged(tmp_path):
    # stage 1: an older log, wall seconds only; stage 2: train_seconds beside the wall time
    old = _log(tmp_path / "stage1.csv", [{"epoch": 1, "seconds": 600, "val_mean_dice": 0.80},
                                         {"epoch": 2, "seconds": 600, "val_mean_dice": 0.86}],
               ["epoch", "seconds", "val_mean_dice"])  # fmt: skip
    new = _log(tmp_path / "stage2.csv", [{"epoch": 1, "seconds": 400, "train_seconds": 300, "val_mean_dice": ""},
                                         {"epoch": 2, "seconds": 400, "train_seconds": 300, "val_mean_dice": 0.91}],
               ["epoch", "seconds", "train_seconds", "val_mean_dice"])  # fmt: skip
    logs = [old, new, tmp_path / "missing.csv"]
    assert training_minutes(logs) == (pytest.approx((1200 + 600) / 60), 4)
    assert minutes_to(logs, 0.85) == pytest.approx(20.0)  # stage 1's second epoch, included
    assert minutes_to(logs, 0.90) == pytest.approx(30.0)  # through stage 2's unvalidated epoch
    assert minutes_to(logs, 0.95) is None
    assert training_minutes([tmp_path / "missing.csv"]) == (None, None)


def test_network_size_counts_what_the_bundle_runs_at_inference():
    # parameters as the config builds them; FLOPs of one slice's eval forward at roi_size, so
    # feedback passes and sampling members multiply the single forward's count
    import torch
    from compare_models import network_size
    from monai.networks.nets import BasicUNet

    params, gflops, _ = network_size(ROWS["BasicUNet (baseline)"].overrides)
    assert params == sum(p.numel() for p in BasicUNet(2, 1, 4, features=(14, 28, 56, 112, 224, 14)).parameters())
    mgrad = network_size([])
    feedback = ROWS["MGRAD-UNet, 3 feedback passes at inference"].overrides
    assert network_size(feedback)[1] == pytest.approx(3 * mgrad[1], rel=0.01)
    medsegdiff = ROWS["MedSegDiff (DDIM 10 steps × 1)"].overrides
    one = network_size(medsegdiff, {"network_def#num_inference_steps": 1})
    three = network_size(medsegdiff, {"network_def#num_inference_steps": 1, "network_def#num_ensemble": 3})
    assert one[0] == three[0] and three[1] == pytest.approx(3 * one[1], rel=0.001)
    assert gflops < mgrad[1] and torch.is_grad_enabled()  # nothing left in inference mode


@pytest.mark.parametrize("name", list(ROWS))
def test_every_rows_configs_merge_after_inference_json_as_its_timing_reads_them(name, tmp_path):
    # the inference seconds run inference.json + the row's configs: a training-only key (train#...)
    # in them fails there, after the row's evaluation has already run
    from compare_models import _inference_only
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    kept = _inference_only(ROWS[name].overrides, tmp_path)
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), *map(str, kept)])
    for key, value in ROWS[name].ids.items():
        parser[key] = value
    assert parser.get_parsed_content("network_def") is not None


def test_each_row_is_evaluated_with_its_own_checkpoint(tmp_path):
    # a row without an override config of its own (the default ckpt_dir) must still be scored with
    # the row's weights: a checkpoint that is not there is the evaluation's error, naming the file
    missing = tmp_path / "not_trained" / "model.pt"
    with pytest.raises(RuntimeError, match="not_trained/model.pt"):
        evaluate(
            [BUNDLE / "configs" / "quick.json"],
            str(BUNDLE / "data" / "synthetic"),
            tmp_path / "out",
            "validation",
            ckpt=missing,
        )


def test_rows_are_read_from_the_experiment_folders_each_with_its_own_weights_logs_and_override():
    from compare_models import EXPERIMENTS, read_rows

    rows = read_rows()
    assert rows == ROWS and len({r.group for r in rows.values()}) == 3
    for row in rows.values():
        assert row.folder.is_relative_to(EXPERIMENTS) and (row.folder / "rows.json").is_file()
        assert row.overrides in ((), (row.folder / "override.json",))
    swin = rows["SwinUNETR"]
    assert swin.weights == EXPERIMENTS / "comparison" / "swinunetr" / "model.pt" and swin.weights.is_file()
    assert [log.name for log in swin.logs] == ["training_log.csv"] and swin.group == "comparison"
    # rows of one training share its weights and logs, and differ by the ids evaluation overrides
    two = rows["MedSegDiff (DDIM 2 steps × 1)"]
    assert two.weights == rows["MedSegDiff (DDIM 10 steps × 1)"].weights
    assert two.ids == {"network_def#num_inference_steps": 2}


def test_a_row_whose_weights_no_longer_fit_its_network_is_left_for_retraining():
    # Hi-gMISnet's gate lost ψ's BatchNorm (#46): the weights trained before do not load; another
    # row's weights still do
    from compare_models import weights_misfit

    assert "psi" in weights_misfit(ROWS["Hi-gMISnet"])
    assert weights_misfit(ROWS["SwinUNETR"]) is None


def test_rows_are_named_by_commas_and_a_name_may_hold_one():
    given = "MGRAD-UNet (shipped weights),MGRAD-UNet, 3 feedback passes at inference,BasicUNet (baseline)"
    assert row_names(given) == ["MGRAD-UNet (shipped weights)", "MGRAD-UNet, 3 feedback passes at inference",
                                "BasicUNet (baseline)"]  # fmt: skip
    with pytest.raises(ValueError, match="unknown row 'BasicUNet'"):
        row_names("MGRAD-UNet (shipped weights),BasicUNet")
