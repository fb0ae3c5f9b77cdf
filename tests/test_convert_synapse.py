"""scripts/convert_synapse.py on small fake TransUNet Synapse folders (real .npz and .h5 files)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_synapse.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_synapse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


synapse = _load_script()
H, W = 16, 12  # unequal, so a swapped axis shows


def _slice(case: int, z: int) -> tuple[np.ndarray, np.ndarray]:
    """A slice whose image encodes (case, z) and whose label uses classes 0..8."""
    image = np.full((H, W), case * 100 + z, np.float32) + np.linspace(0, 0.5, H * W, dtype=np.float32).reshape(H, W)
    label = ((np.arange(H * W).reshape(H, W) + z) % 9).astype(np.float32)  # TransUNet stores labels as float
    return image, label


def _synapse(root: Path, train: dict[int, int] | None = None, test: dict[int, int] | None = None) -> Path:
    """``train``/``test``: case number -> slice count. Slice names are zero-padded for all but case 2,
    whose unpadded names sort wrongly as text (slice10 before slice2)."""
    train = {5: 4, 2: 11, 6: 3} if train is None else train
    test = {1: 3, 8: 2} if test is None else test
    if train:
        (root / "train_npz").mkdir(parents=True)
    for case, count in train.items():
        for z in range(count):
            image, label = _slice(case, z)
            index = f"{z}" if case == 2 else f"{z:03d}"
            np.savez(root / "train_npz" / f"case{case:04d}_slice{index}.npz", image=image, label=label)
    if test:
        (root / "test_vol_h5").mkdir(parents=True)
    for case, count in test.items():
        image, label = (np.stack(a) for a in zip(*(_slice(case, z) for z in range(count))))
        with h5py.File(root / "test_vol_h5" / f"case{case:04d}.npy.h5", "w") as f:
            f["image"], f["label"] = image, label
    return root


def test_volumes_stack_slices_along_the_last_axis_and_monai_loads_every_split(tmp_path, capsys):
    root, out = _synapse(tmp_path / "synapse"), tmp_path / "out"
    synapse.main(str(root), str(out), val_cases=1)

    datalist = out / "dataset.json"
    loaded = {k: load_decathlon_datalist(datalist, True, k, base_dir=out) for k in ("training", "validation", "test")}
    names = {k: [Path(e["image"]).name for e in v] for k, v in loaded.items()}
    # every 3rd of the 3 sorted training cases (case0002, case0005, case0006), counting from the 3rd
    assert names == {
        "training": ["case0002.nii.gz", "case0005.nii.gz"],
        "validation": ["case0006.nii.gz"],
        "test": ["case0001.nii.gz", "case0008.nii.gz"],
    }
    depth = {2: 11, 5: 4, 6: 3, 1: 3, 8: 2}
    for entries in loaded.values():
        for e in entries:
            case = int(Path(e["image"]).name[4:8])
            image, label = nib.load(e["image"]), nib.load(e["label"])
            assert Path(e["label"]).name == f"case{case:04d}_gt.nii.gz"
            assert image.shape == label.shape == (H, W, depth[case])
            assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
            np.testing.assert_array_equal(image.affine, np.eye(4))
            image, label = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
            assert image.dtype == np.float32 and label.dtype == np.uint8
            for z in range(depth[case]):  # slice z, in numeric order, at [..., z]
                np.testing.assert_array_equal(image[..., z], _slice(case, z)[0])
                np.testing.assert_array_equal(label[..., z], _slice(case, z)[1].astype(np.uint8))

    data = json.loads(datalist.read_text())
    assert data["labels"] == {
        "0": "background",
        "1": "aorta",
        "2": "gallbladder",
        "3": "left kidney",
        "4": "right kidney",
        "5": "liver",
        "6": "pancreas",
        "7": "spleen",
        "8": "stomach",
    }
    assert data["test"][0] == {"image": "images/case0001.nii.gz", "label": "labels/case0001_gt.nii.gz"}
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "training 2 cases, validation 1, test 2" in summary


def test_default_keeps_every_training_case_in_training_and_outputs_are_world_readable(tmp_path):
    root, out = _synapse(tmp_path / "synapse"), tmp_path / "out"
    synapse.main(str(root), str(out))
    data = json.loads((out / "dataset.json").read_text())
    assert len(data["training"]) == 3 and data["validation"] == [] and len(data["test"]) == 2
    assert load_decathlon_datalist(out / "dataset.json", True, "validation", base_dir=out) == []
    # the files must be as readable to other users of a shared data folder as any new file here
    reference = tmp_path / "reference"
    reference.touch()
    for f in [out / "dataset.json", *out.glob("*/*.nii.gz")]:
        assert f.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_train_only_conversion_needs_no_h5py(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes "import h5py" fail
    root, out = _synapse(tmp_path / "synapse", test={}), tmp_path / "out"
    synapse.main(str(root), str(out))
    assert "test" not in json.loads((out / "dataset.json").read_text())


def test_test_volumes_without_h5py_say_how_to_install_it(tmp_path, monkeypatch):
    root = _synapse(tmp_path / "synapse", train={})
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        synapse.main(str(root), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_datalist_and_no_temporary_files(tmp_path, monkeypatch):
    root, out = _synapse(tmp_path / "synapse"), tmp_path / "out"
    synapse.main(str(root), str(out))
    real_save = nib.save
    calls = []

    def crash_on_third(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(image, path)

    monkeypatch.setattr(nib, "save", crash_on_third)  # the nibabel module, which mgrad_net.io saves through
    with pytest.raises(KeyboardInterrupt):
        synapse.main(str(root), str(out))
    assert not (out / "dataset.json").exists()
    assert not [p for p in out.rglob(".*")]


def _missing_slice(root: Path) -> str:
    (root / "train_npz" / "case0005_slice002.npz").unlink()
    return "case0005 has slices up to 3 but not slice(s) [2]"


def _no_label_array(root: Path) -> str:
    path = root / "train_npz" / "case0006_slice001.npz"
    np.savez(path, image=np.zeros((H, W), np.float32))
    return f"{path}: no array named ['label']"


def _garbage_npz(root: Path) -> str:
    path = root / "train_npz" / "case0006_slice000.npz"
    path.write_bytes(b"not a zip archive")
    return f"{path}: numpy cannot read it"


def _npy_not_npz(root: Path) -> str:
    path = root / "train_npz" / "case0006_slice000.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((H, W)))
    return f"{path}: holds a single array"


def _slice_shape_differs(root: Path) -> str:
    path = root / "train_npz" / "case0005_slice003.npz"
    np.savez(path, image=np.zeros((H, W + 1), np.float32), label=np.zeros((H, W + 1), np.float32))
    return f"{path}: slice shape"


def _label_shape_differs(root: Path) -> str:
    path = root / "train_npz" / "case0005_slice001.npz"
    np.savez(path, image=np.zeros((H, W), np.float32), label=np.zeros((H, W + 1), np.float32))
    return f"{path}: label shape"


def _bad_label_values(root: Path) -> str:
    path = root / "train_npz" / "case0006_slice002.npz"
    np.savez(path, image=np.zeros((H, W), np.float32), label=np.full((H, W), 2.5, np.float32))
    return f"{path}: label values [2.5]"


def _h5_without_label(root: Path) -> str:
    path = root / "test_vol_h5" / "case0008.npy.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((2, H, W), np.float32)
    return f"{path}: no dataset named ['label']"


def _garbage_h5(root: Path) -> str:
    path = root / "test_vol_h5" / "case0001.npy.h5"
    path.write_bytes(b"not hdf5")
    return f"{path}: h5py cannot read it"


def _h5_label_out_of_range(root: Path) -> str:
    path = root / "test_vol_h5" / "case0001.npy.h5"
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = np.zeros((2, H, W), np.float32), np.full((2, H, W), 9, np.uint8)
    return f"{path}: label values [9]"


def _misnamed_npz(root: Path) -> str:
    path = root / "train_npz" / "case0005_slice001 (copy).npz"
    path.write_bytes(b"")
    return f"{path}: unexpected name"


@pytest.mark.parametrize(
    "damage",
    [
        _missing_slice,
        _no_label_array,
        _garbage_npz,
        _npy_not_npz,
        _slice_shape_differs,
        _label_shape_differs,
        _bad_label_values,
        _h5_without_label,
        _garbage_h5,
        _h5_label_out_of_range,
        _misnamed_npz,
    ],
)
def test_bad_input_names_the_file_and_what_is_wrong(tmp_path, damage):
    root = _synapse(tmp_path / "synapse")
    message = damage(root)
    with pytest.raises(synapse.ConversionError) as error:
        synapse.main(str(root), str(tmp_path / "out"))
    assert message in str(error.value)


def test_input_and_option_errors(tmp_path):
    root = _synapse(tmp_path / "synapse", train={5: 2, 6: 2}, test={})
    with pytest.raises(synapse.ConversionError, match="does not exist"):
        synapse.main(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(synapse.ConversionError, match="neither a train_npz/ nor a test_vol_h5/"):
        synapse.main(str(tmp_path / "empty"), str(tmp_path / "out"))
    for inside in (root, root / "converted", root / "train_npz"):
        with pytest.raises(synapse.ConversionError, match="inside the input folder"):
            synapse.main(str(root), str(inside))
    with pytest.raises(synapse.ConversionError, match="leaves no training cases"):
        synapse.main(str(root), str(tmp_path / "out"), val_cases=2)
    with pytest.raises(synapse.ConversionError, match="val_cases must be"):
        synapse.main(str(root), str(tmp_path / "out"), val_cases=-1)
    assert not (tmp_path / "out").exists() and not (root / "converted").exists()


@pytest.mark.integration
def test_command_line_converts_and_reports_errors_in_one_line(tmp_path):
    root = _synapse(tmp_path / "synapse", train={5: 2}, test={1: 2})
    run = [sys.executable, str(SCRIPT), f"--input_dir={root}"]
    ok = subprocess.run(run + [f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Synapse -> ") and (tmp_path / "out" / "dataset.json").is_file()
    bad = subprocess.run(run + [f"--output_dir={root / 'out'}"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("convert_synapse: error: ") and "Traceback" not in bad.stderr
