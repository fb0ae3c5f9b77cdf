"""Up-front data validation: each bad input gives a clear error naming the file, all at once."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from mgrad_net.data import DataValidationError, check_class_config, load_datalist, validate_datalist


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def good(tmp_path):
    image = np.random.RandomState(0).rand(16, 16, 4).astype(np.float32)
    label = np.zeros((16, 16, 4), np.uint8)
    label[4:8, 4:8] = 3
    return {"image": _save(tmp_path / "good.nii.gz", image), "label": _save(tmp_path / "good_gt.nii.gz", label)}


def _problems(items, num_classes=4, **kwargs):
    with pytest.raises(DataValidationError) as err:
        validate_datalist(items, num_classes, **kwargs)
    return str(err.value)


def test_a_good_case_passes(good):
    assert validate_datalist([good], 4) == 1


def test_bad_files_are_each_named_with_the_reason(tmp_path, good):
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(open(good["image"], "rb").read()[:200])  # cut mid-stream, as a failed copy leaves it
    not_nifti = tmp_path / "text.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    items = [
        {"image": str(tmp_path / "missing.nii.gz"), "label": good["label"]},
        {"image": str(truncated), "label": good["label"]},
        {"image": str(not_nifti), "label": good["label"]},
        {"image": str(empty), "label": good["label"]},
    ]
    message = _problems(items)
    assert message.startswith("4 problem(s)")
    assert f"{tmp_path / 'missing.nii.gz'}: image file does not exist" in message
    assert f"{truncated}: image is not a readable NIfTI file" in message
    assert f"{not_nifti}: image is not a readable NIfTI file" in message
    assert f"{empty}: image file is empty" in message


def test_label_values_shapes_and_dimensions(tmp_path, good):
    seven = np.zeros((16, 16, 4), np.uint8)
    seven[0, 0, 0] = 7
    half = np.full((16, 16, 4), 0.5, np.float32)
    items = [
        {"image": good["image"], "label": _save(tmp_path / "seven_gt.nii.gz", seven)},
        {"image": good["image"], "label": _save(tmp_path / "half_gt.nii.gz", half)},
        {"image": good["image"], "label": _save(tmp_path / "small_gt.nii.gz", np.zeros((8, 16, 4), np.uint8))},
        {"image": _save(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.float32)), "label": good["label"]},
        {"image": _save(tmp_path / "zero.nii.gz", np.zeros((16, 0, 4), np.float32)), "label": good["label"]},
    ]
    nan = np.ones((16, 16, 4), np.float32)
    nan[1, 1, 1] = np.nan
    items.append({"image": _save(tmp_path / "nan.nii.gz", nan), "label": good["label"]})
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    items.append(
        {"image": good["image"], "label": _save(tmp_path / "moved_gt.nii.gz", np.zeros((16, 16, 4), np.uint8), shifted)}
    )
    message = _problems(items)
    lines = message.splitlines()[1:]
    assert len(lines) == 7
    assert "seven_gt.nii.gz: label values [7] outside 0..3 (4 classes)" in message
    assert "half_gt.nii.gz: label values must be integers, found [0.5]" in message
    assert "small_gt.nii.gz: label shape (8, 16, 4) differs from image shape (16, 16, 4)" in message
    assert "flat.nii.gz: image is a 2D image of shape (16, 16)" in message
    assert "zero.nii.gz: image has a zero-sized dimension" in message
    assert "nan.nii.gz: image has 1 NaN or infinite voxel(s)" in message
    assert "moved_gt.nii.gz: label affine differs" in message


def test_four_d_with_one_channel_is_accepted_and_labels_optional_for_inference(tmp_path, good):
    image4d = _save(tmp_path / "four.nii.gz", np.zeros((16, 16, 4, 1), np.float32))
    assert validate_datalist([{"image": image4d, "label": good["label"]}], 4) == 1
    assert validate_datalist([{"image": good["image"]}], 4, require_labels=False) == 1
    assert "no label given" in _problems([{"image": good["image"]}])


def test_datalist_that_is_not_json_or_lacks_the_section(tmp_path, good):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_datalist(tmp_path, bad, "training")
    (tmp_path / "list.json").write_text('{"validation": []}')
    with pytest.raises(ValueError, match="list.json.*'training'"):
        load_datalist(tmp_path, tmp_path / "list.json", "training")


def test_class_count_override_must_match_the_class_names():
    check_class_config(["background", "rv", "myo", "lv"], 4)
    with pytest.raises(ValueError, match="num_classes is 5 but class_names lists 4"):
        check_class_config(["background", "rv", "myo", "lv"], 5)
    with pytest.raises(ValueError, match="num_classes is 1"):
        check_class_config(["background"], 1)
