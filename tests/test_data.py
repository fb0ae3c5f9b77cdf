"""Data sets: the synthetic default, datalists and folders of pairs, output clash checks, atomic writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mgrad_net.data import (
    PHANTOM_CLASSES,
    check_no_overwrite,
    load_datalist,
    short_axis_phantom,
    write_phantom_dataset,
)
from mgrad_net.io import atomic_path, atomic_write_json


def test_phantom_has_the_acdc_classes_and_no_rv_at_the_apex():
    image, label = short_axis_phantom((64, 64, 8), np.random.RandomState(3))
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert (label[..., 0] == 1).any() and not (label[..., -1] == 1).any()
    # blood is brighter than muscle, as in cine MRI
    assert image[label == 3].mean() > image[label == 2].mean() + 0.2


def test_phantom_dataset_is_deterministic_and_loads(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", {"training": 2, "validation": 1}, shape=(32, 32, 4))
    b = write_phantom_dataset(tmp_path / "b", {"training": 2, "validation": 1}, shape=(32, 32, 4))
    listing = json.loads(a.read_text())
    assert listing["labels"] == PHANTOM_CLASSES
    for item in listing["training"] + listing["validation"]:
        for key in ("image", "label"):
            x, y = nib.load(a.parent / item[key]), nib.load(b.parent / item[key])
            np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
            np.testing.assert_allclose(x.affine.diagonal(), [1.5, 1.5, 8.0, 1.0])
    assert not list(a.parent.rglob(".*tmp*"))  # no temporary files left behind


def test_synthetic_default_is_written_on_first_use_only(tmp_path):
    root = tmp_path / "synthetic"
    first = load_datalist(root, None, "validation", synthetic_dir=root)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    second = load_datalist(root, None, "validation", synthetic_dir=root)
    assert first == second and len(first) == 3
    assert (root / "dataset.json").stat().st_mtime_ns == stamp
    assert all(str(root) in item["image"] for item in first)


def test_missing_dataset_dir_is_an_error_never_a_fallback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such"):
        load_datalist(tmp_path / "no_such", None, "training", synthetic_dir=tmp_path / "synthetic")
    assert not (tmp_path / "synthetic").exists()


def _pair(folder, name, suffix="_gt"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in (name, name + suffix):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(folder / f"{n}.nii.gz"))


def test_folder_of_pairs_with_section_subfolders(tmp_path):
    _pair(tmp_path / "training", "case1")
    _pair(tmp_path / "training", "case2", "_seg")
    _pair(tmp_path / "validation", "case3", "_label")
    train = load_datalist(tmp_path, None, "training")
    assert [i["image"].rsplit("/", 1)[1] for i in train] == ["case1.nii.gz", "case2.nii.gz"]
    assert train[1]["label"].endswith("case2_seg.nii.gz")
    assert load_datalist(tmp_path, None, "validation")[0]["label"].endswith("case3_label.nii.gz")


def test_image_without_label_is_named(tmp_path):
    _pair(tmp_path, "good")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "lonely.nii.gz"))
    with pytest.raises(FileNotFoundError, match="lonely.nii.gz"):
        load_datalist(tmp_path, None, "training")
    # a test section may be images only
    assert len(load_datalist(tmp_path, None, "test")) == 2


def test_datalist_json_sections(tmp_path):
    _pair(tmp_path, "a")
    atomic_write_json(tmp_path / "list.json", {"training": [{"image": "a.nii.gz", "label": "a_gt.nii.gz"}]})
    items = load_datalist(tmp_path, tmp_path / "list.json", "training")
    assert items == [{"image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "a_gt.nii.gz")}]
    with pytest.raises(ValueError, match="validation"):
        load_datalist(tmp_path, tmp_path / "list.json", "validation")
    with pytest.raises(FileNotFoundError, match="other.json"):
        load_datalist(tmp_path, tmp_path / "other.json", "training")


def test_check_no_overwrite(tmp_path):
    items = [{"image": str(tmp_path / "x.nii.gz")}, {"image": str(tmp_path / "x_seg.nii.gz")}]
    with pytest.raises(ValueError, match="x_seg.nii.gz"):
        check_no_overwrite(items, tmp_path, "seg")
    with pytest.raises(ValueError, match="x.nii.gz"):
        check_no_overwrite(items[:1], tmp_path, "")
    check_no_overwrite(items[:1], tmp_path / "out", "seg")
    check_no_overwrite(items[:1], tmp_path, "seg")


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    dst = tmp_path / "keep.txt"
    dst.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dst) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert dst.read_text() == "old"
    assert list(tmp_path.iterdir()) == [dst]
