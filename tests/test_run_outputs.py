"""No run is silently mixed with another or read as something it is not (issue #43, items 4, 6, 7,
9 and 10): predictions never become labels, one run writes an output folder at a time, earlier
outputs are kept, every image of a folder is segmented, and what a user can get wrong ends in
one line naming the file.

Real NIfTI files, the bundle's configs run as users run them (in-process through MONAI's
``ConfigWorkflow``, or as a process of their own where the test needs two).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from mgrad_net.checkpoints import lock_output_dir, unlock_ckpt_dir, unlock_output_dir
from mgrad_net.data import short_axis_phantom
from mgrad_net.data.datalist import pair_folder
from mgrad_net.errors import find_user_error
from tests.bundle_utils import CONFIGS, REPO, bundle_command, tmpfs_refusal
from tests.test_training_safety import _last_line

SHIPPED = REPO / "bundle" / "models" / "model.pt"
AFFINE = np.diag([1.5, 1.5, 8.0, 1.0])


def _case(folder, name, label=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    image, seg = short_axis_phantom((64, 64, 3), np.random.RandomState(seed))
    nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"{name}.nii.gz"))
    if label:
        nib.save(nib.Nifti1Image(seg, AFFINE), str(folder / f"{name}_gt.nii.gz"))


def _workflow(names, root, workflow_type, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f"{n}.json") for n in names], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False, workflow_type=workflow_type, bundle_root=str(root), ckpt_path=str(SHIPPED),
        **overrides,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _user_error(excinfo) -> str:
    error = find_user_error(excinfo.value)
    assert error is not None, f"not one of the project's errors: {excinfo.value!r}"
    return str(error)


def test_predictions_are_never_written_where_they_would_be_read_as_labels(tmp_path):
    data = tmp_path / "data"
    _case(data, "a", label=False)
    with pytest.raises(Exception) as excinfo:  # --output_dir the data folder: a_seg.nii.gz would be a's label
        _workflow(["inference"], tmp_path, "infer", dataset_dir=str(data), output_dir=str(data), infer_section="test")
    message = _user_error(excinfo)
    assert f"{data / 'a_seg.nii.gz'}: would lie beside {data / 'a.nii.gz'} named as its label" in message
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["a.nii.gz"]
    # another postfix is no label suffix: allowed there
    _workflow(["inference"], tmp_path, "infer", dataset_dir=str(data), output_dir=str(data), output_postfix="pred")
    assert (data / "a_pred.nii.gz").is_file()


def test_images_named_like_labels_without_an_image_beside_them_are_segmented(tmp_path):
    data = tmp_path / "data"
    for i, name in enumerate(("heart", "scan_seg", "volume_label")):
        _case(data, name, label=False, seed=i)
    assert sorted(os.path.basename(p["image"]) for p in pair_folder(data, require_labels=False)) == [
        "heart.nii.gz", "scan_seg.nii.gz", "volume_label.nii.gz",
    ]  # fmt: skip
    out = tmp_path / "out"
    _workflow(["inference"], tmp_path, "infer", dataset_dir=str(data), output_dir=str(out))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "heart_seg.nii.gz", "scan_seg_seg.nii.gz", "volume_label_seg.nii.gz",
    ]  # fmt: skip


def test_a_second_inference_into_a_folder_being_written_is_refused(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _case(data, "a", label=False)
    lock_output_dir(out)  # this process writes out/, as a first inference would
    try:
        cmd = bundle_command("inference", ["inference"], tmp_path, "--dataset_dir", str(data), "--output_dir",
                             str(out), "--ckpt_path", str(SHIPPED), tiny=False)  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    finally:
        unlock_output_dir(out)
    assert proc.returncode != 0
    assert _last_line(proc.stderr).startswith(f"CkptDirInUseError: output_dir {out} is in use by another run")
    assert not list(out.glob("*.nii.gz"))


def test_a_second_evaluation_keeps_the_first_ones_report(tmp_path):
    data = tmp_path / "data"
    for site in ("site1", "site2"):  # two cases with one file name
        _case(data / "validation" / site, "case", seed=len(site))
    datalist = {"validation": [{"image": f"validation/{s}/case.nii.gz", "label": f"validation/{s}/case_gt.nii.gz"}
                               for s in ("site1", "site2")]}  # fmt: skip
    (data / "dataset.json").write_text(json.dumps(datalist))
    out = tmp_path / "eval"
    for _ in range(2):
        _workflow(["train", "evaluate"], tmp_path, "eval", dataset_dir=str(data), output_dir=str(out))
    kept = sorted(p.name for p in out.iterdir() if "_before_" in p.name)
    assert [n.split("_before_")[0] for n in kept] == ["metrics", "pictures", "summary"], kept
    with (out / "metrics.csv").open() as f:
        cases = {row["case"] for row in csv.DictReader(f)}
    assert cases == {os.path.join("site1", "case.nii.gz"), os.path.join("site2", "case.nii.gz")}
    assert sorted(p.name for p in (out / "pictures").glob("*.png")) == ["case.png", "site2_case.png"]


def test_a_training_keeps_the_log_of_the_run_before(tmp_path):
    data = tmp_path / "data"
    for i in range(2):
        _case(data / "training", f"t{i}", seed=i)
    _case(data / "validation", "v", seed=5)
    tiny = {"network_def#features": [4, 8, 16, 32, 64], "network_def#decoder_channels": 8, "roi_size": [48, 48]}
    small = {"dataset_dir": str(data), "max_epochs": 1, "num_workers": 0, "train#slices_per_volume": 1, **tiny}
    _workflow(["train"], tmp_path, "train", **small)
    unlock_ckpt_dir(tmp_path / "models")
    unlock_output_dir(tmp_path / "eval")
    log = tmp_path / "eval" / "training_log.csv"
    before = log.read_text()
    (tmp_path / "models" / "checkpoint_epoch=1.pt").unlink()  # not the point here: a finished run's state
    _workflow(["train"], tmp_path, "train", **small)
    kept = list(log.parent.glob("training_log_before_*.csv"))
    assert len(kept) == 1 and kept[0].read_text() == before


@pytest.mark.parametrize("problem", ["read-only output_dir", "no labels", "no images"])
def test_what_a_user_gets_wrong_ends_in_one_line_naming_the_folder(tmp_path, problem):
    data, out = tmp_path / "data", tmp_path / "out"
    _case(data, "a", label=False)
    runner, names = "inference", ["inference"]
    wrap = []
    if problem == "read-only output_dir":  # a read-only file system there: refused even for root
        refusal = tmpfs_refusal(out)
        if refusal:
            pytest.skip(refusal)
        wrap = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{out}' && exec \"$@\"", "sh"]
        expected = f"output_dir {out} cannot be written (Read-only file system)"
    elif problem == "no labels":
        runner, names = "evaluating", ["train", "evaluate"]
        expected = f"no label file (<name>_gt.nii.gz, <name>_seg.nii.gz, <name>_label.nii.gz) for: {data / 'a.nii.gz'}"
    else:
        (data / "a.nii.gz").unlink()
        expected = f"no NIfTI images in '{data}'"
    cmd = bundle_command(runner, names, tmp_path, "--dataset_dir", str(data), "--output_dir", str(out),
                         "--ckpt_path", str(SHIPPED), tiny=False)  # fmt: skip
    proc = subprocess.run([*wrap, *cmd], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in _last_line(proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_volume_whose_slice_axis_cannot_be_told_is_named_with_the_override_that_fixes_it(tmp_path):
    image, _ = short_axis_phantom((64, 64, 3), np.random.RandomState(0))
    slices_last, slices_first = tmp_path / "last", tmp_path / "first"
    slices_last.mkdir()
    slices_first.mkdir()
    # the SSL4MIS h5 order (Z×H×W) with the spacing dropped: nothing in the file says where the slices are
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(slices_last / "a.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 0, 1)), np.eye(4)), str(slices_first / "a.nii.gz"))
    with pytest.raises(Exception) as excinfo:
        _workflow(["inference"], tmp_path, "infer", dataset_dir=str(slices_first), output_dir=str(tmp_path / "o1"))
    message = _user_error(excinfo)
    assert f"{slices_first / 'a.nii.gz'}: cannot tell its slice axis" in message and "--slice_axis 0" in message
    assert not (tmp_path / "o1").exists() or not list((tmp_path / "o1").glob("*.nii.gz"))
    # with the override it is segmented in its own planes: as the same voxels stored slices last
    _workflow(
        ["inference"], tmp_path, "infer", dataset_dir=str(slices_first), output_dir=str(tmp_path / "o1"), slice_axis=0
    )
    _workflow(["inference"], tmp_path, "infer", dataset_dir=str(slices_last), output_dir=str(tmp_path / "o2"))
    first = np.asarray(nib.load(tmp_path / "o1" / "a_seg.nii.gz").dataobj)
    last = np.asarray(nib.load(tmp_path / "o2" / "a_seg.nii.gz").dataobj)
    assert first.shape == (3, 64, 64) and len(np.unique(last)) > 1
    np.testing.assert_array_equal(first.transpose(1, 2, 0), last)


def test_unsafe_or_diverged_weights_are_refused_in_one_line(tmp_path):
    from mgrad_net.checkpoints import check_weights
    from mgrad_net.errors import CheckpointError
    from mgrad_net.networks import MGRADUNet

    net = MGRADUNet(features=(4, 8, 16, 32, 64), decoder_channels=8)
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    legacy = tmp_path / "legacy.pt"  # the old, non-zip format, carrying code
    torch.save({"model": Payload()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as excinfo:
        check_weights(legacy, net)
    assert "cannot be loaded safely: it holds Python objects" in str(excinfo.value)
    assert "truncated" not in str(excinfo.value) and "weights_only=False" not in str(excinfo.value)
    assert not marker.exists()

    state = net.state_dict()
    state["encoder.0.conv1.conv.weight"][0, 0, 0, 0] = float("nan")
    diverged = tmp_path / "diverged.pt"
    torch.save({"model": state}, diverged)
    with pytest.raises(CheckpointError, match=r"hold NaN or infinite values \(encoder.0.conv1.conv.weight\)"):
        check_weights(diverged, net)
