"""Fine-tuning to a user's own class set (issue #45): ``--finetune true`` with other ``class_names``
loads every weight whose shape still fits, starts the output layers fresh and names them; weights
of another architecture are still refused. The bundle run as users run it, on real NIfTI files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mgrad_net.checkpoints import read_records
from mgrad_net.data import write_phantom_dataset
from tests.bundle_utils import run_bundle
from tests.test_training_safety import SMALL, _last_line

pytestmark = pytest.mark.integration


def _two_classes(root: Path) -> Path:
    """Phantoms whose label is one structure (every foreground class merged), as a 2-class data set."""
    write_phantom_dataset(root, counts={"training": 2, "validation": 1}, shape=(32, 32, 2))
    for item in (
        json.loads((root / "dataset.json").read_text())["training"]
        + json.loads((root / "dataset.json").read_text())["validation"]
    ):
        path = root / item["label"]
        label = nib.load(path)
        nib.save(nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine), str(path))
    return root


def test_finetuning_to_another_class_set_loads_what_fits_and_names_the_rest(tmp_path):
    four = tmp_path / "four"
    write_phantom_dataset(four / "data", counts={"training": 2, "validation": 1}, shape=(32, 32, 2))
    run_bundle("training", ["train"], four, "--dataset_dir", str(four / "data"), "--max_epochs", "1", *SMALL)
    source = torch.load(four / "models" / "model.pt", weights_only=True)

    two = tmp_path / "two"
    data = _two_classes(two / "data")
    proc = run_bundle(
        "training", ["train"], two, "--dataset_dir", str(data), "--class_names", '["background","left atrium"]',
        "--finetune", "true", "--ckpt_path", str(four / "models" / "model.pt"), "--learning_rate", "0",
        "--max_epochs", "1", *SMALL,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "fine-tuning to another class set" in output and "start fresh" in output
    tuned = torch.load(two / "models" / "model.pt", weights_only=True)
    assert read_records(two / "models" / "model.pt")["record"]["class_names"] == ["background", "left atrium"]
    heads = [k for k, v in tuned.items() if v.shape != source[k].shape]
    assert heads and all(tuned[k].shape[0] == 2 for k in heads)
    for name in ("encoder.0.conv1.conv.weight", "rfbs.2.shortcut.conv.weight"):  # loaded, and a rate of 0 kept them
        torch.testing.assert_close(tuned[name], source[name])
    for name in heads:
        assert name in _last_line(output) or name in output


def test_finetuning_from_weights_of_another_width_builds_the_widths_their_record_names(tmp_path):
    four = tmp_path / "four"
    (tmp_path / "other").mkdir()
    write_phantom_dataset(four / "data", counts={"training": 2, "validation": 1}, shape=(32, 32, 2))
    run_bundle("training", ["train"], four, "--dataset_dir", str(four / "data"), "--max_epochs", "1", *SMALL)
    proc = run_bundle(
        "training", ["train"], tmp_path / "other", "--dataset_dir", str(four / "data"), "--finetune", "true",
        "--ckpt_path", str(four / "models" / "model.pt"), "--network_def#features", "[8,16,32,64,128]",
        "--max_epochs", "1", *SMALL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(its record), not this config's network: built that one" in proc.stdout + proc.stderr
    tuned = torch.load(tmp_path / "other" / "models" / "model.pt", weights_only=True)
    source = torch.load(four / "models" / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in source.items()}
