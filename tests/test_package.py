"""The bundle archive works on its own: unzipped in an empty folder and run, through
``monai.bundle run`` and ``monai.bundle.load``, by a Python of its own into which pip installed
exactly the versions the archive's metadata.json pins (and what they depend on), nothing more:
no ``mgrad_net``, nothing of this environment. A package the metadata forgot fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_utils import REPO, verify_bundle_module

pytestmark = pytest.mark.integration

WEIGHTS = REPO / "bundle" / "models" / "model.pt"
NAME = "cardiac_mri_mgrad_unet_segmentation"


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    if not WEIGHTS.is_file():
        pytest.skip(f"no shipped weights at {WEIGHTS}")
    out = tmp_path_factory.mktemp("dist")
    archive = out / "cardiac_mri_mgrad_unet_segmentation.zip"
    subprocess.run([sys.executable, str(REPO / "scripts" / "package_bundle.py"), "--output", str(archive)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    target = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        z.extractall(target)
    assert "cardiac_mri_mgrad_unet_segmentation/scripts/mgrad_net/networks/mgrad_unet.py" in names
    assert "cardiac_mri_mgrad_unet_segmentation/models/model.pt" in names
    assert "cardiac_mri_mgrad_unet_segmentation/models/model.ts" in names
    assert not any("__pycache__" in n or n.endswith("checkpoint") for n in names)
    meta = json.loads((target / "cardiac_mri_mgrad_unet_segmentation/configs/metadata.json").read_text())
    assert "mgrad-net" not in meta["required_packages_version"]
    return target


@pytest.fixture(scope="module")
def isolated_python(unpacked, tmp_path_factory) -> str:
    """A venv without system site packages; pip installs the archive's pinned versions into it."""
    meta = json.loads((unpacked / NAME / "configs" / "metadata.json").read_text())
    pins = [f"{name}=={version}" for name, version in verify_bundle_module().pinned_versions(meta).items()]
    root = tmp_path_factory.mktemp("isolated-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = str(root / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", *pins], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"pip install {' '.join(pins)} failed:\n{proc.stderr[-3000:]}"
    probe = subprocess.run([python, "-c", "import monai, torch, fire, matplotlib; import mgrad_net"],
                           capture_output=True, text=True, cwd=root, env=env)  # fmt: skip
    assert "No module named 'mgrad_net'" in probe.stderr, probe.stderr[-2000:]
    return python


def test_archive_runs_inference_in_a_venv_of_its_pins(unpacked, isolated_python, tmp_path):
    bundle = unpacked / "cardiac_mri_mgrad_unet_segmentation"
    cmd = [isolated_python, "-m", "monai.bundle", "run", "inference",
           "--config_file", "configs/inference.json", "--output_dir", str(tmp_path / "segs")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    segs = sorted((tmp_path / "segs").glob("*_seg.nii.gz"))
    synthetic = bundle / "data" / "synthetic"
    listing = json.loads((synthetic / "dataset.json").read_text())["test"]
    images = sorted(synthetic / item["image"] for item in listing)
    assert segs and len(segs) == len(images)
    for image, seg in zip(images, segs):
        a, b = nib.load(image), nib.load(seg)
        assert b.shape == a.shape
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
        assert set(np.unique(np.asarray(b.dataobj))) <= {0, 1, 2, 3}


_LOAD = """
import sys, torch, monai.bundle
net = monai.bundle.load(name="cardiac_mri_mgrad_unet_segmentation", bundle_dir=sys.argv[1], workflow_type="inference")
print(type(net).__module__, type(net).__name__)
scripted = torch.jit.load(sys.argv[1] + "/cardiac_mri_mgrad_unet_segmentation/models/model.ts")
x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    torch.save({"eager": net.eval()(x), "scripted": scripted(x)}, sys.argv[2])
"""


def test_archive_loads_with_monai_bundle_load(unpacked, isolated_python, tmp_path):
    bundle = unpacked / "cardiac_mri_mgrad_unet_segmentation"
    out = tmp_path / "out.pt"
    proc = subprocess.run([isolated_python, "-c", _LOAD, str(unpacked), str(out)],
                          cwd=bundle, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-2:] == ["mgrad_net.networks.mgrad_unet", "MGRADUNet"]

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = net(x)
    outputs = torch.load(out, weights_only=True)
    torch.testing.assert_close(outputs["eager"], expected)
    torch.testing.assert_close(outputs["scripted"], expected, atol=1e-4, rtol=1e-4)  # the shipped TorchScript


def test_archive_lists_its_weights_in_large_files_yml_and_verify_checks_them(unpacked, tmp_path):
    import hashlib
    import shutil

    import yaml

    bundle = unpacked / "cardiac_mri_mgrad_unet_segmentation"
    listing = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in listing] == ["models/model.pt", "models/model.ts"]
    assert {e["hash_type"] for e in listing} == {"md5"}
    assert listing[0]["hash_val"] == hashlib.md5(WEIGHTS.read_bytes()).hexdigest()
    assert listing[1]["hash_val"] == hashlib.md5((bundle / "models" / "model.ts").read_bytes()).hexdigest()
    check = verify_bundle_module().check_large_files
    assert "2 file(s)" in check(bundle)

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with open(copy / "models" / "model.pt", "r+b") as f:  # one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="models/model.pt: md5"):
        check(copy)
    (copy / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="models/model.pt, which is missing"):
        check(copy)
