"""scripts/convert_acdc.py on small fake ACDC trees written as real NIfTI files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_acdc.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_acdc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


acdc = _load_script()
SHAPE = (16, 16, 3)


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _patient(folder: Path, number: int, es: int = 12, labels: bool = True, info: bool = True) -> None:
    """One ACDC patient folder: ED frame 1, ES frame ``es``, Info.cfg and the (ignored) 4D cine."""
    name = f"patient{number:03d}"
    d = folder / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(number)
    for frame in (1, es):
        _save(rng.integers(0, 1000, SHAPE, dtype=np.int16), d / f"{name}_frame{frame:02d}.nii.gz")
        if labels:
            _save(rng.integers(0, 4, SHAPE, dtype=np.uint8), d / f"{name}_frame{frame:02d}_gt.nii.gz")
    _save(np.zeros(SHAPE + (4,), np.int16), d / f"{name}_4d.nii.gz")
    if info:
        (d / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")


def _acdc(root: Path, train: range = range(1, 21), test: range = range(101, 104), test_labels: bool = True) -> Path:
    for n in train:
        _patient(root / "training", n)
    for n in test:
        _patient(root / "testing", n, labels=test_labels)
    return root


def _patients(entries: list[dict]) -> set[str]:
    return {Path(e["image"]).name.split("_")[0] for e in entries}


def test_monai_loads_every_split_and_patients_stay_in_one_split(tmp_path, capsys):
    root, out = _acdc(tmp_path / "acdc"), tmp_path / "out"
    acdc.main(str(root), str(out), val_patients=4)

    datalist = out / "dataset.json"
    loaded = {k: load_decathlon_datalist(datalist, True, k, base_dir=out) for k in ("training", "validation", "test")}
    assert [len(loaded[k]) for k in ("training", "validation", "test")] == [32, 8, 6]
    for entries in loaded.values():
        for e in entries:
            assert Path(e["image"]).is_file() and Path(e["label"]).is_file()
            assert Path(e["label"]).name == Path(e["image"]).name.replace(".nii.gz", "_gt.nii.gz")
    # every 5th of 20 sorted patients, counting from the 5th
    assert _patients(loaded["validation"]) == {"patient005", "patient010", "patient015", "patient020"}
    sets = [_patients(loaded[k]) for k in ("training", "validation", "test")]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 23
    for entries in loaded.values():  # both frames of every patient, never the 4D file
        names = {Path(e["image"]).name for e in entries}
        assert names == {f"{p}_frame{f:02d}.nii.gz" for p in _patients(entries) for f in (1, 12)}

    data = json.loads(datalist.read_text())
    assert data["labels"] == {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
    assert all(not os.path.isabs(p) for k in ("training", "validation", "test") for e in data[k] for p in e.values())

    link = out / "images" / "patient001_frame12.nii.gz"
    source = root / "training" / "patient001" / "patient001_frame12.nii.gz"
    assert link.is_symlink() and os.readlink(link) == os.path.abspath(source)
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "training 16 patients / 32 volumes" in summary
    assert "validation 4 / 8" in summary and "test 3 / 6 with labels" in summary


def test_copy_writes_regular_files_with_the_source_voxels(tmp_path):
    root, out = _acdc(tmp_path / "acdc", range(1, 4), range(0)), tmp_path / "out"
    acdc.main(str(root), str(out), val_patients=1, copy=True)

    image = out / "images" / "patient002_frame01.nii.gz"
    label = out / "labels" / "patient002_frame01_gt.nii.gz"
    assert not image.is_symlink() and not label.is_symlink()
    source = root / "training" / "patient002" / "patient002_frame01_gt.nii.gz"
    loaded = nib.load(str(label))
    assert loaded.shape == SHAPE and loaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(loaded.dataobj), np.asanyarray(nib.load(str(source)).dataobj))
    # no test patients: no "test" key, since MONAI's loader fails on an empty "test" list
    assert "test" not in json.loads((out / "dataset.json").read_text())


def test_symlink_failure_falls_back_to_copying(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise OSError("symbolic links not supported")

    monkeypatch.setattr(acdc.os, "symlink", refuse)
    root, out = _acdc(tmp_path / "acdc", range(1, 3), range(0)), tmp_path / "out"
    acdc.main(str(root), str(out), val_patients=0)
    files = list((out / "images").iterdir()) + list((out / "labels").iterdir())
    assert len(files) == 8 and not any(f.is_symlink() for f in files)
    assert "symlinks not supported" in capsys.readouterr().out


def test_testing_patients_without_labels_become_image_only_test_entries(tmp_path):
    root, out = _acdc(tmp_path / "acdc", range(1, 4), range(101, 103), test_labels=False), tmp_path / "out"
    acdc.main(str(root), str(out), val_patients=1)
    test = load_decathlon_datalist(out / "dataset.json", True, "test", base_dir=out)
    assert len(test) == 4 and all(set(e) == {"image"} and Path(e["image"]).is_file() for e in test)


def test_testing_only_tree_converts_whatever_val_patients_is(tmp_path):
    root, out = _acdc(tmp_path / "acdc", range(0), range(101, 103)), tmp_path / "out"
    acdc.main(str(root), str(out))
    data = json.loads((out / "dataset.json").read_text())
    assert data["training"] == [] and data["validation"] == [] and len(data["test"]) == 4


def test_without_info_cfg_every_frame_file_is_converted(tmp_path):
    root = tmp_path / "acdc"
    _patient(root / "training", 1, es=7, info=False)
    _patient(root / "training", 2, es=9, info=False)
    acdc.main(str(root), str(tmp_path / "out"), val_patients=0)
    images = {Path(e["image"]).name for e in json.loads((tmp_path / "out" / "dataset.json").read_text())["training"]}
    assert images == {
        "patient001_frame01.nii.gz",
        "patient001_frame07.nii.gz",
        "patient002_frame01.nii.gz",
        "patient002_frame09.nii.gz",
    }


def test_interrupted_run_leaves_no_datalist_and_no_temporary_files(tmp_path, monkeypatch):
    root, out = _acdc(tmp_path / "acdc", range(1, 4), range(0)), tmp_path / "out"
    acdc.main(str(root), str(out), val_patients=1)
    calls = []
    real_replace = os.replace

    def crash_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(acdc.os, "replace", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        acdc.main(str(root), str(out), val_patients=1, copy=True)
    # the earlier run's datalist is gone rather than pointing at a half-replaced set of files
    assert not (out / "dataset.json").exists()
    assert not [p for p in out.rglob(".*")]


def _drop_label(root: Path) -> Path:
    label = root / "training" / "patient002" / "patient002_frame12_gt.nii.gz"
    label.unlink()
    return label


def _garbage_image(root: Path) -> Path:
    image = root / "training" / "patient003" / "patient003_frame01.nii.gz"
    image.write_bytes(b"not a nifti file")
    return image


def _truncated_image(root: Path) -> Path:
    image = root / "training" / "patient001" / "patient001_frame12.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    return image


def _bad_label_values(root: Path) -> Path:
    label = root / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    _save(np.full(SHAPE, 7, np.uint8), label)
    return label


def _wrong_label_shape(root: Path) -> Path:
    label = root / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    _save(np.zeros((16, 16, 4), np.uint8), label)
    return label


def _missing_frame(root: Path) -> Path:
    image = root / "training" / "patient002" / "patient002_frame12.nii.gz"
    image.unlink()
    return image


def _bad_info(root: Path) -> Path:
    cfg = root / "training" / "patient002" / "Info.cfg"
    cfg.write_text("ED: first\nES: 12\n")
    return cfg


def _partly_labelled_test(root: Path) -> Path:
    label = root / "testing" / "patient102" / "patient102_frame01_gt.nii.gz"
    label.unlink()
    return label


@pytest.mark.parametrize(
    "damage, message",
    [
        (_drop_label, "label not found"),
        (_garbage_image, "nibabel cannot read"),
        (_truncated_image, "nibabel cannot read"),
        (_bad_label_values, r"label values \[7\]"),
        (_wrong_label_shape, "differs from its image"),
        (_missing_frame, "image not found"),
        (_bad_info, "'ED: <frame number>'"),
        (_partly_labelled_test, "other testing/ frames have labels"),
    ],
)
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, damage, message):
    root, out = _acdc(tmp_path / "acdc", range(1, 4), range(101, 103)), tmp_path / "out"
    bad = damage(root)
    with pytest.raises(acdc.ConversionError, match=message) as error:
        acdc.main(str(root), str(out), val_patients=1)
    assert str(bad) in str(error.value)
    assert not out.exists()


def test_input_and_option_errors(tmp_path):
    root = _acdc(tmp_path / "acdc", range(1, 3), range(0))
    with pytest.raises(acdc.ConversionError, match="does not exist"):
        acdc.main(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty" / "database").mkdir(parents=True)
    with pytest.raises(acdc.ConversionError, match="neither a training/ nor a testing/.*database"):
        acdc.main(str(tmp_path / "empty"), str(tmp_path / "out"))
    for inside in (root, root / "converted", root / "training" / "x"):
        with pytest.raises(acdc.ConversionError, match="inside the input folder"):
            acdc.main(str(root), str(inside), val_patients=0)
    with pytest.raises(acdc.ConversionError, match="leaves no training patients"):
        acdc.main(str(root), str(tmp_path / "out"), val_patients=2)
    with pytest.raises(acdc.ConversionError, match="val_patients must be"):
        acdc.main(str(root), str(tmp_path / "out"), val_patients=True)
    assert not (tmp_path / "out").exists() and not (root / "converted").exists()


@pytest.mark.integration
def test_command_line_converts_and_reports_errors_in_one_line(tmp_path):
    root = _acdc(tmp_path / "acdc", range(1, 3), range(0))
    run = [sys.executable, str(SCRIPT), f"--input_dir={root}"]
    ok = subprocess.run(run + [f"--output_dir={tmp_path / 'out'}", "--val_patients=1"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ACDC -> ") and (tmp_path / "out" / "dataset.json").is_file()
    bad = subprocess.run(run + [f"--output_dir={root / 'out'}"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("convert_acdc: error: ") and "Traceback" not in bad.stderr
