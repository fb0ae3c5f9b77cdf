"""MONAI Label serves the bundle: a real ``monailabel start_server`` on loopback, real HTTP, real NIfTI.

The server runs in a virtual environment of its own (MONAI Label 0.8.5 needs torch and torchvision
as a matching pair, and numpy < 2), built by ``scripts/monailabel/setup_venv.sh`` on first use and
reused after (``$MGRAD_MONAILABEL_VENV``, default ``~/.cache/mgrad-net/monailabel-venv``). It serves a copy of
the bundle's configs with freshly made tiny weights, through the app in ``scripts/monailabel``, over a
studies folder of two synthetic short-axis volumes whose affine is not RAS. The test reads
``/info/``, segments a volume with ``POST /infer/…`` and compares the result with the bundle's own
``monai.bundle run inference`` on the same weights, submits labels, trains one epoch with
``POST /train/…``, and segments again with the weights that run wrote. The server's whole process
group is stopped at the end, whatever happened.

Part of the default run: ``tests/conftest.py`` starts the venv build in the background as soon as the
run includes this test, and puts this test last. Alone: ``bash scripts/test_monailabel.sh``; left out:
``-m "not compile and not slow and not monailabel"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mgrad_net.data.phantoms import short_axis_phantom
from tests.bundle_utils import CONFIGS, REPO, TINY_OVERRIDES, free_port, run_bundle

pytestmark = pytest.mark.monailabel

APP = REPO / "scripts" / "monailabel"
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
VENV = Path(os.environ.get("MGRAD_MONAILABEL_VENV") or _CACHE / "mgrad-net" / "monailabel-venv")
MODEL = "mgrad_unet"
# the real architecture at a width and slice size a CPU affords: the bundle tests' overrides, as a dict
TINY = {k.removeprefix("--"): json.loads(v) for k, v in zip(TINY_OVERRIDES[::2], TINY_OVERRIDES[1::2])}
SHAPE = (70, 60, 6)  # H×W×Z: not square, not a multiple of 16, so resizing and its inverse matter
# LPS-like: x and y flipped, anisotropic spacing, an origin off zero; the bundle orients to RAS
AFFINE = np.array([[-1.4, 0, 0, 95.0], [0, -1.3, 0, 110.0], [0, 0, 8.0, -20.0], [0, 0, 0, 1]])

VENV_TIMEOUT = 2700  # first build: a few GB of packages
START_TIMEOUT = 300
INFER_TIMEOUT = 300
TRAIN_TIMEOUT = 900


def _class_names() -> dict[int, str]:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    return {int(k): v for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}


# ---------------------------------------------------------------------------------------- HTTP


def _request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Server:
    """``monailabel start_server`` in its own process group, logging to a file."""

    def __init__(self, app: Path, studies: Path, bundle: Path, overrides: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["VIRTUAL_ENV"] = str(VENV)
        env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        # this clone's mgrad_net first, whatever clone last installed itself into the shared venv
        env["PYTHONPATH"] = str(REPO)
        env.setdefault("OMP_NUM_THREADS", "2")
        cmd = [
            str(VENV / "bin" / "monailabel"), "start_server",
            "--app", str(app), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--conf", "bundle", str(bundle),
            "--conf", "bundle_overrides", str(overrides),
        ]  # fmt: skip
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=app, env=env, start_new_session=True
        )

    def log_tail(self, n: int = 6000) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) before /info/:\n{self.log_tail()}")
            try:
                status, body = _request("GET", f"{self.url}/info/", timeout=10)
                if status == 200:
                    return json.loads(body)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(2)
        raise AssertionError(f"no /info/ within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the whole group (server and any training process it spawned), then SIGKILL."""
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue
                # the leader is gone; make sure no child of the group outlives it
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
        self._log.close()


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    """MONAI Label's venv, built once by the project's own script (reused when up to date)."""
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(APP / "setup_venv.sh"), str(VENV)], capture_output=True, text=True, timeout=VENV_TIMEOUT
    )
    assert proc.returncode == 0, f"setup_venv.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"\n{proc.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.0f} s)")
    return VENV


def _tiny_weights(bundle: Path) -> None:
    """``models/model.pt``: the inference config's network at the tiny width, BatchNorm statistics
    gathered on phantom slices so that an untrained network still gives varied labels."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for k, v in TINY.items():
        parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    rng = np.random.RandomState(1)
    net.train()
    with torch.no_grad():
        for _ in range(5):
            image, _ = short_axis_phantom((48, 48, 4), rng)
            net(torch.from_numpy(np.moveaxis(image, -1, 0)[:, None].copy()))
    net.eval()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")  # as the bundle's best-model saver does


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("monailabel")
    # the app, copied: start_server creates model/ lib/ logs/ bin/ in the app folder
    app = root / "app"
    app.mkdir()
    shutil.copy(APP / "main.py", app / "main.py")
    # the bundle's configs as they are, with tiny weights of its own
    bundle = root / "bundle"
    shutil.copytree(CONFIGS, bundle / "configs")
    (bundle / "models").mkdir()
    _tiny_weights(bundle)
    overrides = root / "tiny.json"
    overrides.write_text(json.dumps(TINY))
    # two volumes as an annotator's folder holds them; their reference labels kept aside
    studies, truth = root / "studies", root / "truth"
    studies.mkdir()
    truth.mkdir()
    rng = np.random.RandomState(7)
    for name in ("case_a", "case_b"):
        image, label = short_axis_phantom(SHAPE, rng)
        nib.save(nib.Nifti1Image((image * 1000).astype(np.int16), AFFINE), studies / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), truth / f"{name}.nii.gz")
    return {"root": root, "app": app, "bundle": bundle, "overrides": overrides, "studies": studies, "truth": truth}


@pytest.fixture(scope="module")
def server(monailabel_venv, workspace):
    """One ``monailabel start_server`` for the module's tests, stopped at the end whatever happened."""
    ws = workspace
    running = Server(ws["app"], ws["studies"], ws["bundle"], ws["overrides"], ws["root"] / "server.log")
    try:
        running.info = running.wait_ready(START_TIMEOUT)
        yield running
    finally:
        running.stop()
    assert running.proc.poll() is not None, "the server outlived stop()"


def _reference_segmentation(ws: dict[str, Path], name: str) -> np.ndarray:
    """The bundle's own inference (``monai.bundle run inference``, this venv) on the same weights."""
    data = ws["root"] / "reference_in" / "test"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(ws["studies"] / f"{name}.nii.gz", data / f"{name}.nii.gz")
    out = ws["root"] / "reference_out"
    run_bundle("inference", ["inference"], ws["bundle"], "--dataset_dir", str(data.parent), "--output_dir", str(out))
    return np.asarray(nib.load(out / f"{name}_seg.nii.gz").dataobj)


def _infer(server: Server, name: str, dst: Path) -> nib.Nifti1Image:
    body, headers = _multipart({"params": json.dumps({"device": "cpu"})}, {})
    status, content = _request(
        "POST", f"{server.url}/infer/{MODEL}?image={name}&output=image", body, headers, timeout=INFER_TIMEOUT
    )
    assert status == 200, f"/infer/{MODEL} answered {status}: {content[:2000]!r}\n{server.log_tail()}"
    dst.write_bytes(content)
    return nib.load(dst)


# ----------------------------------------------------------------------------------------- test


# what MONAI Label's BundleTrainTask copies from a training request into the bundle's config
FORWARDED = (
    "max_epochs", "val_split", "pretrained", "multi_gpu", "force_multi_gpu", "run_id", "gpus", "device",
    "tracking", "tracking_uri", "tracking_experiment_name", "tracking_run_name", "model_filename",
)  # fmt: skip
JSON = {"Content-Type": "application/json"}


def test_no_request_runs_code_through_the_bundle(server, workspace):
    """A ``$`` payload in each field MONAI Label forwards, on every route that reaches the bundle, is
    answered 422 naming the field, and nothing runs: the file the payload would create never appears."""
    marker = workspace["root"] / "payload_ran"
    payload = f"$__import__('pathlib').Path({str(marker)!r}).touch()"
    base = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
    for field in (*FORWARDED, "tracking_uri_as_list"):
        params = {**base, field: payload} if field != "tracking_uri_as_list" else {**base, "tracking_uri": [payload]}
        status, content = _request("POST", f"{server.url}/train/{MODEL}", json.dumps(params).encode(), JSON)
        assert status == 422 and field.removesuffix("_as_list").encode() in content, (field, status, content[:500])
    # the route that trains every model, and batch inference: both run in a background process
    status, content = _request("POST", f"{server.url}/train/", json.dumps({MODEL: {"run_id": payload}}).encode(), JSON)
    assert status == 422, (status, content[:500])
    status, content = _request(
        "POST", f"{server.url}/batch/infer/{MODEL}", json.dumps({"device": payload}).encode(), JSON
    )
    assert status == 422, (status, content[:500])
    # inference, its params a form field
    for params in ({"device": payload}, {"model_filename": "../../x.pt"}, {"anything": {"_target_": "os.system"}}):
        body, headers = _multipart({"params": json.dumps(params)}, {})
        status, content = _request("POST", f"{server.url}/infer/{MODEL}?image=case_a&output=image", body, headers)
        assert status == 422, (params, status, content[:500])
    time.sleep(5)  # a background task started by any of them would have run its first lines by now
    status, content = _request("GET", f"{server.url}/train/")
    assert status == 404, f"a training task was started: {content[:500]!r}"  # "No Train Tasks Found"
    assert not marker.exists(), f"a request ran code:\n{server.log_tail()}"


def test_monailabel_serves_infers_and_trains_the_bundle(server, workspace):
    ws = workspace
    classes = _class_names()
    source = nib.load(ws["studies"] / "case_a.nii.gz")
    model_pt = ws["bundle"] / "models" / "model.pt"
    weights_before = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    reference = _reference_segmentation(ws, "case_a")

    # /info/: the model, its labels from metadata.json's channel_def, and its trainer
    info = server.info
    print(f"/info/ labels: {info['labels']}; model: {json.dumps(info['models'][MODEL], default=str)}")
    assert MODEL in info["models"], info
    model_info = info["models"][MODEL]
    assert model_info["type"] == "segmentation"
    assert model_info["labels"] == {v: k for k, v in classes.items() if k != 0}
    assert set(info["labels"]) == {v for k, v in classes.items() if k != 0}
    assert model_info["dimension"] == 3
    assert MODEL in info["trainers"], info

    # the datastore sees both volumes, none labelled yet
    status, body = _request("GET", f"{server.url}/datastore/?output=all")
    assert status == 200
    assert set(json.loads(body)["objects"]) == {"case_a", "case_b"}

    # POST /infer: a segmentation in the input's grid, ACDC label values, same as the bundle's own
    seg_img = _infer(server, "case_a", ws["root"] / "case_a_infer.nii.gz")
    seg = np.asarray(seg_img.dataobj)
    print(f"infer: shape {seg.shape} dtype {seg.dtype} labels {np.unique(seg).tolist()}")
    print(f"infer: affine equal to the input's: {np.allclose(seg_img.affine, source.affine, atol=1e-5)}")
    assert seg.shape == source.shape == SHAPE
    np.testing.assert_allclose(seg_img.affine, source.affine, atol=1e-5)
    assert seg.dtype == np.uint8, seg.dtype  # the app writes label maps as the bundle does
    values = set(np.unique(seg).astype(int).tolist())
    assert values <= set(classes), values
    assert len(values) >= 2, f"an all-{values} segmentation says nothing about the round trip"
    agreement = float((seg.astype(int) == reference.astype(int)).mean())
    print(f"infer: agreement with `monai.bundle run inference`: {agreement:.5f}")
    assert agreement >= 0.99, agreement

    # an annotator submits both volumes' final labels
    for name in ("case_a", "case_b"):
        body, headers = _multipart({"params": "{}"}, {"label": ws["truth"] / f"{name}.nii.gz"})
        status, content = _request("PUT", f"{server.url}/datastore/label?image={name}&tag=final", body, headers)
        assert status == 200, f"save label {name}: {status} {content[:1000]!r}"
    labels_dir = ws["studies"] / "labels" / "final"
    assert sorted(p.name for p in labels_dir.glob("*.nii.gz")) == ["case_a.nii.gz", "case_b.nii.gz"]

    # POST /train: one epoch as MONAI Label runs it (a background process), polled to its end
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "pretrained": True}
    body = json.dumps(params).encode()
    status, content = _request(
        "POST", f"{server.url}/train/{MODEL}", body, {"Content-Type": "application/json"}, timeout=60
    )
    assert status == 200, f"/train/{MODEL}: {status} {content[:2000]!r}"
    started = time.monotonic()
    task: dict = {}
    while time.monotonic() - started < TRAIN_TIMEOUT:
        status, content = _request("GET", f"{server.url}/train/", timeout=30)
        assert status == 200, (status, content[:1000])
        task = json.loads(content)
        if task.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED"):
            break
        time.sleep(3)
    train_s = time.monotonic() - started
    details = "\n".join(map(str, task.get("details", [])))[-6000:]
    print(f"train: status {task.get('status')} after {train_s:.0f} s; result {task.get('result')}")
    assert task.get("status") == "DONE", f"train task: {task.get('status')}\n{details}\n{server.log_tail()}"
    assert "Training Finished" in details or "Training Finished" in server.log_tail(200000), details
    log_csv = ws["bundle"] / "eval" / "training_log.csv"
    assert log_csv.exists(), f"no training log:\n{details}"
    rows = log_csv.read_text().strip().splitlines()
    print(f"train: training_log.csv {rows}")
    assert len(rows) == 2, rows  # header + the one epoch
    # the best weights replaced models/model.pt, where inference loads them; the old ones were kept
    assert hashlib.sha256(model_pt.read_bytes()).hexdigest() != weights_before
    kept = list((ws["bundle"] / "models").glob("model_before_*.pt"))
    assert len(kept) == 1 and hashlib.sha256(kept[0].read_bytes()).hexdigest() == weights_before

    # inference picks up the new weights, still in the input's grid
    seg2_img = _infer(server, "case_b", ws["root"] / "case_b_infer.nii.gz")
    seg2 = np.asarray(seg2_img.dataobj)
    assert seg2.shape == SHAPE
    np.testing.assert_allclose(seg2_img.affine, nib.load(ws["studies"] / "case_b.nii.gz").affine, atol=1e-5)
    assert set(np.unique(seg2).astype(int).tolist()) <= set(classes)
    assert "Reload model from cache" in server.log_tail(200000), "inference did not reload the new weights"
