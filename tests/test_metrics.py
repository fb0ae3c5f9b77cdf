"""Distances in millimetres where the files carry their spacing, in voxels where they do not."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.networks.utils import one_hot
from monai.transforms import LoadImage

from mgrad_net.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric, distance_unit, spacing_of

SPACING = (1.5, 0.75, 8.0)


def _label_pair(tmp_path, affine: np.ndarray):
    """A ground truth box and the same box shifted by 2 voxels along the first axis, as NIfTI files
    with ``affine``, loaded back by MONAI (MetaTensors with the files' affines)."""
    gt = np.zeros((24, 24, 6), np.uint8)
    gt[6:14, 8:16, 1:5] = 1
    pred = np.roll(gt, 2, axis=0)
    for name, data in (("gt", gt), ("pred", pred)):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    y, p = (load(tmp_path / f"{n}.nii.gz") for n in ("gt", "pred"))
    return one_hot(p[None].long(), 2, dim=1), one_hot(y[None].long(), 2, dim=1)


def test_a_file_with_spacing_is_measured_in_millimetres(tmp_path):
    y_pred, y = _label_pair(tmp_path, np.diag([*SPACING, 1.0]))
    assert distance_unit(y.affine) == "mm"
    assert spacing_of(y, 3) == [list(SPACING)]
    hd = HausdorffDistanceMetric(include_background=False)(y_pred, y)
    assert hd.item() == pytest.approx(2 * SPACING[0])  # the 2-voxel shift, 1.5 mm each
    plain = HausdorffDistanceMetric(include_background=False)(y_pred.as_tensor(), y.as_tensor())
    assert plain.item() == pytest.approx(2.0)  # no metadata: voxels, as MONAI's own metric gives
    asd = SurfaceDistanceMetric(include_background=False, symmetric=True)(y_pred, y)
    voxels = SurfaceDistanceMetric(include_background=False, symmetric=True)(y_pred.as_tensor(), y.as_tensor())
    assert 0 < voxels.item() < asd.item() <= 1.5 * voxels.item() + 1e-6


def test_an_identity_affine_stays_in_voxels_and_says_so(tmp_path):
    y_pred, y = _label_pair(tmp_path, np.eye(4))
    assert distance_unit(y.affine) == "voxels" and spacing_of(y, 3) is None
    assert HausdorffDistanceMetric(include_background=False)(y_pred, y).item() == pytest.approx(2.0)


def test_an_explicit_spacing_still_wins(tmp_path):
    y_pred, y = _label_pair(tmp_path, np.diag([*SPACING, 1.0]))
    metric = HausdorffDistanceMetric(include_background=False)
    assert metric(y_pred, y, spacing=(2.0, 2.0, 2.0)).item() == pytest.approx(4.0)


def test_monai_handler_passes_each_case_its_own_spacing(tmp_path):
    """Two decollated cases of different spacing through MONAI's IgniteMetricHandler, as the
    bundle's evaluate.json uses it: each case's distance in its own millimetres."""
    from ignite.engine import Engine

    cases = []
    for i, spacing in enumerate(((1.5, 1.5, 8.0), (0.5, 0.5, 8.0))):
        folder = tmp_path / str(i)
        folder.mkdir()
        y_pred, y = _label_pair(folder, np.diag([*spacing, 1.0]))
        cases.append({"pred": y_pred[0], "label": y[0]})
    handler = IgniteMetricHandler(
        metric_fn=HausdorffDistanceMetric(include_background=False),
        output_transform=from_engine(["pred", "label"]),
        save_details=True,
    )
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine, "hd")
    engine.run([cases], max_epochs=1)
    details = torch.as_tensor(engine.state.metric_details["hd"]).flatten().tolist()
    assert details == pytest.approx([3.0, 1.0])
    assert engine.state.metrics["hd"] == pytest.approx(2.0)
