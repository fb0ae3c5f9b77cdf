"""Pictures: overlays of segmentations on their images, and training curves, as real PNG files."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mgrad_net.handlers import TRAINING_LOG_FIELDS
from mgrad_net.networks import MGRADUNet
from mgrad_net.visualize import (
    CLASS_COLOURS,
    class_colour,
    foreground_slices,
    overlay_rgb,
    plot_training_log,
    write_case_picture,
)
from tests.bundle_utils import REPO, run_bundle

CLASSES = ["right ventricle", "myocardium", "left ventricle"]
ALPHA = 0.45


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _pixels_of(rgb: np.ndarray, colour) -> np.ndarray:
    """Boolean map of the pixels exactly of ``colour``."""
    return (rgb == np.asarray(colour, np.uint8)).all(axis=-1)


def _blended_on_black(index: int) -> tuple[int, ...]:
    return tuple(int(round(ALPHA * v)) for v in class_colour(index))


def test_colours_are_fixed_per_class_and_distinct():
    assert class_colour(1) == (230, 25, 75)  # right ventricle, red
    assert class_colour(2) == (60, 180, 75)  # myocardium, green
    assert class_colour(3) == (0, 130, 200)  # left ventricle, blue
    assert len(set(CLASS_COLOURS)) == len(CLASS_COLOURS)
    assert class_colour(len(CLASS_COLOURS) + 1) == class_colour(1)
    with pytest.raises(ValueError, match="background"):
        class_colour(0)


def test_overlay_blends_the_class_colour_exactly_where_the_label_has_that_class():
    image = np.linspace(0.0, 1.0, 20 * 30, dtype=np.float32).reshape(20, 30)
    labels = np.zeros((20, 30), np.int64)
    labels[2:6, 3:9] = 1
    labels[10:15, 12:20] = 3
    rgb = overlay_rgb(image, labels, alpha=ALPHA)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    grey = image * 255.0
    for c in (1, 3):
        mask = labels == c
        expected = (1 - ALPHA) * grey[mask][:, None] + ALPHA * np.asarray(class_colour(c))[None]
        np.testing.assert_allclose(rgb[mask], expected, atol=0.51)
    background = labels == 0
    assert (rgb[background] == np.round(grey[background])[:, None]).all()  # untouched grey
    with pytest.raises(ValueError, match="same H×W"):
        overlay_rgb(image, labels[:, :10])


def test_slices_are_chosen_through_the_foreground():
    labels = np.zeros((8, 8, 20), np.int64)
    labels[2:5, 2:5, 6:15] = 2
    chosen = foreground_slices(labels, 3)
    assert len(chosen) == 3 and all(6 <= z < 15 for z in chosen)
    assert chosen == sorted(chosen) and chosen[0] > 6 and chosen[-1] < 14  # interior, not the thin ends
    assert foreground_slices(np.zeros((4, 4, 5), np.int64), 2) == [1, 3]  # no foreground: spread over all
    labels_few = np.zeros((4, 4, 9), np.int64)
    labels_few[..., 2] = 1
    assert foreground_slices(labels_few, 3) == [2]  # fewer labelled slices than asked: all of them
    labels_few[..., 3:6] = 1
    assert foreground_slices(labels_few, 3) == [2, 4, 5]  # as many as labelled: distinct


def _case(depth: int = 10):
    """A black image; ground truth: RV (1) on slices 3–6; prediction: LV (3) on the same slices."""
    image = np.zeros((40, 40, depth), np.float32)
    label = np.zeros_like(image, dtype=np.int64)
    label[5:25, 8:30, 3:7] = 1
    pred = np.zeros_like(label)
    pred[10:35, 10:30, 3:7] = 3
    return image, label, pred


def test_case_picture_has_one_panel_per_slice_and_row(tmp_path):
    image, label, pred = _case()
    three = write_case_picture(tmp_path / "three.png", image, label, pred, CLASSES, title="case", n_slices=3)
    two = write_case_picture(tmp_path / "two.png", image, label, pred, CLASSES, title="case", n_slices=2)
    only_pred = write_case_picture(tmp_path / "pred.png", image, None, pred, CLASSES, n_slices=3)
    # panels of 3 inches at 100 dpi, plus one inch of title and legend
    assert _png(three).shape == (2 * 300 + 100, 3 * 300, 3)
    assert _png(two).shape == (2 * 300 + 100, 2 * 300, 3)
    assert _png(only_pred).shape == (300 + 100, 3 * 300, 3)
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic: no temporary file left behind


def test_ground_truth_colours_are_in_the_top_row_and_prediction_colours_below(tmp_path):
    image, label, pred = _case()
    rgb = _png(write_case_picture(tmp_path / "case.png", image, label, pred, CLASSES, n_slices=3, alpha=ALPHA))
    height = rgb.shape[0]
    rv, myo, lv = (_pixels_of(rgb, _blended_on_black(c)) for c in (1, 2, 3))
    rv_rows, lv_rows = np.nonzero(rv)[0], np.nonzero(lv)[0]
    # each slice shows a 20×22-voxel RV: at 40 voxels per 300-pixel panel, thousands of pixels
    assert rv.sum() > 3 * 10_000 and lv.sum() > 3 * 10_000
    assert rv_rows.max() < (height - 100) / 2 + 50  # ground truth: upper row only
    assert lv_rows.min() > (height - 100) / 2 + 50  # prediction: lower row only
    assert myo.sum() == 0  # a class in neither volume is nowhere drawn
    # the three panels of a row: the RV appears in three separate horizontal runs
    columns = np.flatnonzero(rv.any(axis=0))
    assert (np.diff(columns) > 1).sum() == 2


def test_case_picture_refuses_volumes_on_different_grids(tmp_path):
    image, label, pred = _case()
    with pytest.raises(ValueError, match="not on the image's grid"):
        write_case_picture(tmp_path / "bad.png", image, label[:20], pred, CLASSES)
    assert not (tmp_path / "bad.png").exists()


def _write_log(path, epochs: int, validated=lambda e: True):
    fields = list(TRAINING_LOG_FIELDS) + [f"val_dice_{n}" for n in CLASSES]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for e in range(1, epochs + 1):
            dice = [1 - math.exp(-e / k) for k in (4, 3, 2)]
            row = {"epoch": e, "iterations": 4 * e, "loss": 2.0 * math.exp(-e / 3), "lr": 0.003, "seconds": 1.0}
            if validated(e):
                row |= {"val_mean_dice": sum(dice) / 3, "best_val_mean_dice": sum(dice) / 3}
                row |= {f"val_dice_{n}": d for n, d in zip(CLASSES, dice)}
            writer.writerow(row)


def test_training_curve_png_shows_each_class_in_its_colour(tmp_path):
    log = tmp_path / "training_log.csv"
    _write_log(log, epochs=6, validated=lambda e: e % 2 == 0)  # validation every second epoch: gaps
    rgb = _png(plot_training_log(log, tmp_path / "curve.png"))
    assert rgb.shape == (400, 1100, 3)
    for c in (1, 2, 3):
        assert _pixels_of(rgb, class_colour(c)).sum() > 20, f"class {c}'s curve is missing"
    assert _pixels_of(rgb, class_colour(4)).sum() == 0  # no fourth class in the log


def test_training_curve_of_an_empty_log_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no epochs"):
        plot_training_log(tmp_path / "missing.csv", tmp_path / "curve.png")
    assert not (tmp_path / "curve.png").exists()


def test_plot_training_cli(tmp_path):
    log, png = tmp_path / "training_log.csv", tmp_path / "out" / "curve.png"
    _write_log(log, epochs=3)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_training.py"), str(log), str(png)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(png) in proc.stdout
    assert _png(png).shape == (400, 1100, 3)


def test_bundle_evaluate_writes_one_picture_per_case(tmp_path):
    """``evaluate`` on the synthetic default with untrained weights of the tiny network."""
    (tmp_path / "models").mkdir()
    net = MGRADUNet(out_channels=4, features=(4, 8, 16, 32, 64), decoder_channels=8)
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    run_bundle("evaluating", ["train", "evaluate"], tmp_path)
    data = tmp_path / "data" / "synthetic"
    cases = [item["image"] for item in json.loads((data / "dataset.json").read_text())["validation"]]
    pictures = tmp_path / "eval" / "pictures"
    expected = sorted(name.split("/")[-1].replace(".nii.gz", ".png") for name in cases)
    assert sorted(p.name for p in pictures.iterdir()) == expected
    for png in pictures.iterdir():
        rgb = _png(png).astype(np.int64)
        assert rgb.shape == (2 * 300 + 100, 3 * 300, 3)
        # the ground-truth row (above the legend's strip) shows every structure in its class colour
        # blended on the grey image: each colour tips grey pixels (R = G = B) towards its hue
        r, g, b = (rgb[: 2 * 300 // 2 + 50, :, i] for i in range(3))
        assert ((r - g > 60) & (r - b > 40)).sum() > 500, f"{png.name}: no right ventricle"
        assert ((g - r > 30) & (g - b > 30)).sum() > 500, f"{png.name}: no myocardium"
        assert ((b - r > 60) & (b - g > 20)).sum() > 500, f"{png.name}: no left ventricle"
    assert (tmp_path / "eval" / "metrics.csv").is_file()  # the report still written beside them
