"""Inference keeps what the user owns and segments in the acquisition's own planes (#24, inference side).

Real NIfTI files on disk; the bundle's ``inference.json`` run in-process with the shipped weights,
through MONAI's ``ConfigWorkflow`` as ``python -m monai.bundle run`` does (a subprocess only where
the test needs a process of its own: a SIGKILL, a private full file system).
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from monai.transforms import Compose, LoadImaged, Orientationd, ScaleIntensityRanged

from mgrad_net.data import SliceAxisLastd, check_no_overwrite, short_axis_phantom, slice_axis, validate_datalist
from mgrad_net.errors import NoSpaceLeftError, OverwriteRefusedError, find_user_error
from tests.bundle_utils import CONFIGS, REPO, SHARED_DATA, bundle_command, tmpfs_refusal

SHIPPED = REPO / "bundle" / "models" / "model.pt"
SPACING = (1.5, 1.5, 8.0)  # a short-axis cine stack: fine in-plane, coarse between slices
AXIAL = np.diag([*SPACING, 1.0])


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _phantom(shape=(64, 64, 4), seed=0) -> tuple[np.ndarray, np.ndarray]:
    return short_axis_phantom(shape, np.random.RandomState(seed))


def _infer(root: Path, dataset_dir: Path, output_dir: Path, run: bool = True, **overrides) -> None:
    """The bundle's inference (its ``initialize``, then its ``run`` when ``run``) with the shipped weights."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type="infer", bundle_root=str(root), dataset_dir=str(dataset_dir), output_dir=str(output_dir),
        ckpt_path=str(SHIPPED), **overrides,
    )  # fmt: skip
    workflow.initialize()
    if run:
        workflow.run()
    workflow.finalize()


def _refusal(excinfo) -> OverwriteRefusedError:
    error = find_user_error(excinfo.value)
    assert isinstance(error, OverwriteRefusedError), excinfo.value
    return error


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- 1. no overwrite


def test_inference_never_replaces_a_file_it_did_not_write(tmp_path):
    data = tmp_path / "data"
    image, label = _phantom()
    _save(data / "case.nii.gz", image, AXIAL)
    _save(data / "case_seg.nii.gz", label, AXIAL)  # the ground truth, "_seg" being a label suffix
    before = _files(data)
    with pytest.raises(Exception) as excinfo:
        _infer(tmp_path, data, output_dir=data)  # output_dir is the data folder
    message = str(_refusal(excinfo))
    assert f"{data / 'case_seg.nii.gz'}: would lie beside {data / 'case.nii.gz'} named as its label" in message
    assert _files(data) == before  # refused before anything was written
    with pytest.raises(Exception) as excinfo:  # a prediction never replaces a label, even when asked to overwrite
        _infer(tmp_path, data, output_dir=data, overwrite="true")
    assert _files(data) == before

    out = tmp_path / "out"
    out.mkdir()
    (out / "case_seg.nii.gz").write_bytes(b"an earlier file")  # an existing file, no label of anything there
    with pytest.raises(Exception) as excinfo:
        _infer(tmp_path, data, output_dir=out)
    assert str(out / "case_seg.nii.gz") in str(_refusal(excinfo)) and "--overwrite true" in str(_refusal(excinfo))
    _infer(tmp_path, data, output_dir=out, overwrite="true")  # asked for, as on the command line
    assert _files(data) == before
    written = nib.load(out / "case_seg.nii.gz")
    assert written.get_data_dtype() == np.uint8 and written.shape == label.shape


def test_the_inference_log_names_the_files_written_not_their_temporaries(tmp_path, capsys):
    from monai.data.image_writer import logger as writer_logger

    data, out = tmp_path / "data", tmp_path / "out"
    _save(data / "case.nii.gz", _phantom()[0], AXIAL)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    writer_logger.addHandler(handler)
    try:
        _infer(tmp_path, data, output_dir=out)
    finally:
        writer_logger.removeHandler(handler)
    assert records == [f"writing: {out / 'case_seg.nii.gz'}"] and (out / "case_seg.nii.gz").is_file()
    assert capsys.readouterr().out.splitlines()[-2:] == ["outputs:", f"  segmentations: {out}"]  # the run's last words


# ------------------------------------------------------------------------- 2. one output per input


def test_one_file_name_in_two_folders_gives_two_outputs(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shapes = {"site1": (64, 56, 3), "site2": (48, 64, 2)}
    for seed, (site, shape) in enumerate(shapes.items()):
        _save(data / site / "image.nii.gz", _phantom(shape, seed)[0], AXIAL)
    (data / "dataset.json").write_text(json.dumps({"test": [{"image": f"{site}/image.nii.gz"} for site in shapes]}))
    _infer(tmp_path, data, out)
    assert sorted(_files(out)) == ["site1/image_seg.nii.gz", "site2/image_seg.nii.gz"]
    for site, shape in shapes.items():
        assert nib.load(out / site / "image_seg.nii.gz").shape == shape  # each input's own segmentation


def test_inputs_that_would_share_an_output_are_refused_naming_both(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    image = _phantom((32, 32, 2))[0]
    pair = [_save(data / "image.nii", image, AXIAL), _save(data / "image.nii.gz", image, AXIAL)]  # one output name
    with pytest.raises(Exception) as excinfo:
        _infer(tmp_path, data, out, run=False)  # a plain folder of images: both are listed
    message = str(_refusal(excinfo))
    assert f"the output of both {pair[0]} and {pair[1]}" in message
    assert not out.exists()
    with pytest.raises(OverwriteRefusedError, match="both"):  # --overwrite does not make it right
        check_no_overwrite([{"image": str(p)} for p in pair], out, "seg", overwrite=True)


# ------------------------------------------------------------- 5. an interrupted run's temporaries

_KILLED_WRITER = """
import sys, numpy as np, torch
from monai.data import MetaTensor
from monai.transforms import SaveImaged
from mgrad_net.io import AtomicNibabelWriter
big = MetaTensor(torch.randint(0, 255, (1, 512, 512, 160), dtype=torch.uint8))
big.meta["filename_or_obj"] = sys.argv[2]
save = SaveImaged("pred", output_dir=sys.argv[1], output_postfix="seg", output_dtype=np.uint8, resample=False,
                  separate_folder=False, writer=AtomicNibabelWriter, print_log=False)
print("writing", flush=True)
save({"pred": big})
print("done", flush=True)
"""


def test_a_rerun_removes_the_temporaries_of_a_killed_run_and_nothing_else(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _save(data / "case.nii.gz", _phantom()[0], AXIAL)
    writer = [sys.executable, "-c", _KILLED_WRITER, str(out), str(data / "case.nii.gz")]
    proc = subprocess.Popen(writer, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)  # killed while it writes case_seg.nii.gz
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the write ended before the kill; make the volume larger"
    leftovers = sorted(p.name for p in out.iterdir())
    assert len(leftovers) == 1 and leftovers[0].startswith(".case_seg.nii.gz.") and leftovers[0].endswith(".tmp.nii.gz")
    others = [
        ".case_seg.nii.gz.notes.tmp.nii.gz",  # no hex
        ".other_seg.nii.gz.0123456789ab.tmp.nii.gz",  # not an output of this run
        "case_seg.nii.gz.0123456789ab.tmp.nii.gz",  # not hidden
    ]
    for name in others:  # not this run's temporary pattern: kept
        (out / name).write_bytes(b"not ours")

    _infer(tmp_path, data, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(others + ["case_seg.nii.gz"])


# ------------------------------------------------------------------------------ 7. slicing plane


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    return np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])


def _affine(linear: np.ndarray, origin=(-40.0, 25.0, 60.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


def test_the_same_voxels_under_any_affine_give_the_same_segmentation(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    image, label = _phantom((72, 64, 4), seed=3)
    oblique = _rotation(np.radians(35), np.radians(50))
    affines = {
        "axial": AXIAL,
        "sagittal": _affine(np.array([[0, 0, 8.0], [1.5, 0, 0], [0, 1.5, 0]])),  # slices along x
        "oblique": _affine(oblique @ np.diag(SPACING)),  # double oblique
        "lps": np.diag([-1.5, -1.5, 8.0, 1.0]),
    }
    for name, affine in affines.items():
        _save(data / f"{name}.nii.gz", image, affine)
    # the same stack stored with its slices first (coarse axis 0), double oblique
    first = np.ascontiguousarray(np.moveaxis(image, 2, 0))
    _save(data / "slices_first.nii.gz", first, _affine(oblique @ np.diag([8.0, 1.5, 1.5])))
    _infer(tmp_path, data, out)

    segs = {}
    for path in sorted(data.iterdir()):
        seg = nib.load(out / path.name.replace(".nii.gz", "_seg.nii.gz"))
        source = nib.load(path)
        assert seg.shape == source.shape
        np.testing.assert_allclose(seg.affine, source.affine, atol=1e-5)  # the input's exact grid
        segs[path.name[: -len(".nii.gz")]] = np.asarray(seg.dataobj)
    axial = segs.pop("axial")
    assert {1, 2, 3} <= set(np.unique(axial).tolist())  # a real segmentation, the LV found slice by slice
    lv = 2 * ((axial == 3) & (label == 3)).sum() / ((axial == 3).sum() + (label == 3).sum())
    assert lv > 0.6
    segs["slices_first"] = np.moveaxis(segs["slices_first"], 0, 2)  # in the axial one's array order
    differing = {name: float(np.mean(seg != axial)) for name, seg in segs.items()}  # fraction of voxels
    assert differing == dict.fromkeys(segs, 0.0)


@pytest.mark.parametrize(
    "spacing, shape, expected",
    [
        ((1.5, 1.5, 8.0), (64, 64, 10), 2),  # slices last
        ((8.0, 1.5, 1.5), (10, 64, 64), 0),  # slices first
        ((1.4, 9.0, 1.4), (64, 10, 64), 1),
        ((1.0, 1.0, 1.0), (64, 64, 64), 2),  # isotropic (ACDC's files): the stored last axis
        ((1.2, 1.2, 1.0), (64, 64, 64), 2),  # near-isotropic: the stored last axis
        ((1.5, 1.5, 1.5), (64, 64, 1), 2),  # one slice
        ((8.0, 1.5, 1.5), (1, 64, 64), 0),
    ],
)
def test_the_slicing_axis_rule(spacing, shape, expected):
    assert slice_axis(_affine(_rotation(0.3, 1.1) @ np.diag(spacing)), shape) == expected


def _volumes_as_the_network_saw_them(paths: list[Path], orient) -> list:
    load = Compose([LoadImaged("image", ensure_channel_first=True), orient])
    return [load({"image": str(p)})["image"] for p in paths]


def test_volumes_stored_slices_last_reach_the_network_as_before(tmp_path):
    """ACDC (identity affine), the synthetic phantoms (RAS, 8 mm slices): the array is exactly what
    the former preprocessing, RAS then the last axis, gave the network."""
    paths = [_save(tmp_path / "phantom.nii.gz", _phantom()[0], AXIAL)]
    acdc = SHARED_DATA / "acdc" / "validation"
    paths += sorted(p for p in acdc.glob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))[:4] if acdc.is_dir() else []
    before = _volumes_as_the_network_saw_them(paths, Orientationd("image", axcodes="RAS"))
    after = _volumes_as_the_network_saw_them(paths, SliceAxisLastd("image"))
    for path, old, new in zip(paths, before, after):
        np.testing.assert_array_equal(new.numpy(), old.numpy(), err_msg=str(path))
        np.testing.assert_allclose(new.affine.numpy(), old.affine.numpy(), err_msg=str(path))
    if not acdc.is_dir():
        pytest.skip(f"shared ACDC data not found at {acdc}: checked on the phantom only")


# ------------------------------------------------------------------------------- 8. output shapes


def test_the_output_has_the_inputs_spatial_shape(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    image = _phantom((64, 56, 3))[0]
    _save(data / "one_slice.nii.gz", image[..., :1], AXIAL)  # H×W×1
    _save(data / "one_channel.nii.gz", image[..., None], AXIAL)  # H×W×Z×1
    _infer(tmp_path, data, out)
    assert nib.load(out / "one_slice_seg.nii.gz").shape == (64, 56, 1)
    assert nib.load(out / "one_channel_seg.nii.gz").shape == (64, 56, 3)


# ------------------------------------------------------------------------- 9. CT to the MRI preset


def _ct_in_hounsfield_units(shape=(48, 40, 3)) -> np.ndarray:
    """Air at -1000 HU around an elliptic body of soft tissue (40 HU) with a bright spine."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    ct = np.full(shape, -1000, np.int16)
    ct[(yy / 0.8) ** 2 + (xx / 0.6) ** 2 <= 1] = 40
    ct[(yy - 0.5) ** 2 + xx**2 <= 0.02] = 700
    return ct


def test_a_ct_volume_given_to_the_mri_preset_is_named_in_a_warning_not_refused(tmp_path, caplog):
    data, out = tmp_path / "data", tmp_path / "out"
    ct = _save(data / "abdomen_ct.nii.gz", _ct_in_hounsfield_units(), np.diag([0.8, 0.8, 5.0, 1.0]))
    _save(data / "heart_mri.nii.gz", _phantom((48, 40, 3))[0], AXIAL)
    with caplog.at_level(logging.WARNING, logger="mgrad_net"):
        _infer(tmp_path, data, out)
    warnings = [r.getMessage() for r in caplog.records if r.name == "mgrad_net" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(ct) in warnings[0] and "Hounsfield" in warnings[0] and "MRI" in warnings[0]
    assert sorted(_files(out)) == ["abdomen_ct_seg.nii.gz", "heart_mri_seg.nii.gz"]  # segmented all the same

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgrad_net"):  # the CT preset's window expects HU
        window = ScaleIntensityRanged("image", -125, 275, 0, 1)
        validate_datalist([{"image": str(ct)}], 9, require_labels=False, intensity_transform=window)
    assert not [r for r in caplog.records if r.name == "mgrad_net"]


# ---------------------------------------------------------------------------------- 14. full disk


def test_a_full_disk_is_named(tmp_path):
    data, out = tmp_path / "data", tmp_path / "full"
    reason = tmpfs_refusal(out)
    if reason:
        pytest.skip(reason)
    _save(data / "case.nii.gz", _phantom((48, 40, 2))[0], AXIAL)
    listing = tmp_path / "listing.txt"
    command = bundle_command(
        "inference", ["inference"], tmp_path, "--dataset_dir", str(data), "--output_dir", str(out),
        "--ckpt_path", str(SHIPPED), tiny=False,
    )  # fmt: skip
    script = (  # a 64 KiB tmpfs, filled up; the bundle runs into it; what is left on it is listed
        f"mount -t tmpfs -o size=64k tmpfs '{out}' && (dd if=/dev/zero of='{out}/filler' bs=4k 2>/dev/null; true) && "
        f"{shlex.join(command)}; rc=$?; ls -A '{out}' > '{listing}'; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert f"no space left on {out}" in lines[-1], proc.stderr[-3000:]  # the last line says it
    assert NoSpaceLeftError.__name__ in lines[-1]
    assert listing.read_text().split() == ["filler"]  # no partial output, no temporary file left
