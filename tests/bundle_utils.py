"""Running the bundle the way users do: ``python -m monai.bundle run …`` in a subprocess."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
EXPERIMENTS = REPO / "experiments"
SHARED_DATA = REPO.parent / "shared" / "data"

# the real architecture at a width and slice size a CPU test can afford
TINY_OVERRIDES = [
    "--network_def#features", "[4,8,16,32,64]",
    "--network_def#decoder_channels", "8",
    "--roi_size", "[48,48]",
]  # fmt: skip


def free_port() -> int:
    """A loopback port nobody listens on, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_files(*names: str) -> list[str]:
    """The config files of a command, as the model card lists them: ``("train", "evaluate")``
    stands for ``['configs/train.json', 'configs/evaluate.json']``; a name that is not a bundle
    config is an experiment's override: ``"comparison/swinunetr"`` for
    ``experiments/comparison/swinunetr/override.json``."""
    return [str(CONFIGS / f"{n}.json" if (CONFIGS / f"{n}.json").is_file() else EXPERIMENTS / n / "override.json")
            for n in names]  # fmt: skip


def configs(*names: str) -> str:
    """:func:`config_files` as the JSON list ``--config_file`` takes."""
    return json.dumps(config_files(*names))


def bundle_command(
    runner: str | None, config_names: list[str], bundle_root: Path, *overrides: str, tiny: bool = True
) -> list[str]:
    """``python -m monai.bundle run [runner] --config_file [...] --bundle_root … <overrides>``.

    ``config_names`` as :func:`config_files` takes them; ``tiny`` adds :data:`TINY_OVERRIDES`
    before ``overrides``.
    """
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if runner:
        cmd.append(runner)
    cmd += [
        "--config_file", configs(*config_names),
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(bundle_root),
        *(TINY_OVERRIDES if tiny else []),
        *overrides,
    ]  # fmt: skip
    return cmd


def run_bundle(
    runner: str | None,
    config_names: list[str],
    bundle_root: Path,
    *overrides: str,
    check: bool = True,
    tiny: bool = True,
) -> subprocess.CompletedProcess:
    """Runs :func:`bundle_command` to its end; ``check`` raises with its output when it fails."""
    cmd = bundle_command(runner, config_names, bundle_root, *overrides, tiny=tiny)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bundle_root)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def tmpfs_refusal(folder: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here (``unshare -m``, a mount namespace of its own), or None."""
    if shutil.which("unshare") is None:
        return "no unshare command to mount a private tmpfs"
    folder.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o size=64k tmpfs '{folder}'"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs (needs root or user namespaces): {probe.stderr.strip()}"
    return None


def assert_segmentations_in_inputs_geometry(bundle_root: Path, segs: Path) -> None:
    """Every test case of the embedded synthetic data has a ``_seg`` label map in ``segs`` with its
    image's shape and affine and ACDC's labels only."""
    import nibabel as nib
    import numpy as np

    synthetic = bundle_root / "data" / "synthetic"
    for item in json.loads((synthetic / "dataset.json").read_text())["test"]:
        image = synthetic / item["image"]
        seg = nib.load(segs / image.name.replace(".nii.gz", "_seg.nii.gz"))
        img = nib.load(image)
        assert seg.shape == img.shape
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}


def verify_bundle_module():
    """``scripts/verify_bundle.py`` imported as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("verify_bundle", REPO / "scripts" / "verify_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
