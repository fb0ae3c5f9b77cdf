"""The bundle archive works on its own: unzipped in an empty folder, run by a Python that has MONAI
and torch but no ``mgrad_net``, through ``monai.bundle run`` and ``monai.bundle.load``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_utils import REPO

WEIGHTS = REPO / "bundle" / "models" / "model.pt"


@pytest.fixture(scope="module")
def python_without_mgrad_net(tmp_path_factory) -> str:
    """A venv that sees this environment's packages (MONAI, torch …) through a plain path entry,
    which, unlike a site folder, does not run their .pth files: the editable mgrad_net stays out."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = str(root / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run([python, "-c", "import monai, torch; import mgrad_net"], capture_output=True, text=True, cwd=root)
    assert "No module named 'mgrad_net'" in probe.stderr, probe.stderr[-2000:]
    return python


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
    assert not any("__pycache__" in n or n.endswith("checkpoint") for n in names)
    meta = json.loads((target / "cardiac_mri_mgrad_unet_segmentation/configs/metadata.json").read_text())
    assert "mgrad-net" not in meta["required_packages_version"]
    return target


def test_archive_runs_inference_without_the_package(unpacked, python_without_mgrad_net, tmp_path):
    bundle = unpacked / "cardiac_mri_mgrad_unet_segmentation"
    cmd = [python_without_mgrad_net, "-m", "monai.bundle", "run", "inference",
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
x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    torch.save(net.eval()(x), sys.argv[2])
"""


def test_archive_loads_with_monai_bundle_load(unpacked, python_without_mgrad_net, tmp_path):
    bundle = unpacked / "cardiac_mri_mgrad_unet_segmentation"
    out = tmp_path / "out.pt"
    proc = subprocess.run([python_without_mgrad_net, "-c", _LOAD, str(unpacked), str(out)],
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
    torch.testing.assert_close(torch.load(out, weights_only=True), expected)


def _verify_module():
    spec = importlib.util.spec_from_file_location("verify_bundle", REPO / "scripts" / "verify_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_archive_lists_its_weights_in_large_files_yml_and_verify_checks_them(unpacked, tmp_path):
    import hashlib
    import shutil

    import yaml

    bundle = unpacked / "cardiac_mri_mgrad_unet_segmentation"
    listing = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in listing] == ["models/model.pt"] and listing[0]["hash_type"] == "md5"
    assert listing[0]["hash_val"] == hashlib.md5(WEIGHTS.read_bytes()).hexdigest()
    check = _verify_module().check_large_files
    assert "1 file(s)" in check(bundle)

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
