"""scripts/compare_models.py's training columns, from training logs written by the bundle's own
TrainingLog format: minutes over stages, and minutes to first reach a validation Dice."""

from __future__ import annotations

import csv
import sys

import pytest

from tests.bundle_utils import REPO

sys.path.insert(0, str(REPO / "scripts"))
from compare_models import minutes_to, training_minutes  # noqa: E402


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
