"""Export from the bundle, as a deployer runs it: ``python -m monai.bundle ckpt_export`` (TorchScript)
and ``onnx_export`` (ONNX, run with onnxruntime), each compared with the eager network.

Tolerance: 1e-4 absolute on the logits (float32 on the CPU; measured differences are about 1e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tests.bundle_utils import CONFIGS, TINY_OVERRIDES

ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Weights of the bundle's network at test width, with BatchNorm statistics that are not the defaults."""
    root = tmp_path_factory.mktemp("export")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    for key, value in zip(TINY_OVERRIDES[::2], TINY_OVERRIDES[1::2]):
        parser[key.lstrip("-")] = json.loads(value)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        net.train()(torch.rand(4, 1, 64, 64))  # moves the running statistics off their initial values
    torch.save(net.state_dict(), root / "model.pt")
    return root, net.eval()


def _export(command: str, root, filepath, *extra: str) -> None:
    cmd = [
        sys.executable, "-m", "monai.bundle", command, "network_def",
        "--filepath", str(filepath),
        "--ckpt_file", str(root / "model.pt"),
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--config_file", str(CONFIGS / "inference.json"),
        "--bundle_root", str(root),
        "--input_shape", "[1, 1, 64, 64]",
        *TINY_OVERRIDES,
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert filepath.is_file()


def _eager(net, x):
    with torch.inference_mode():
        return net(x).numpy()


def test_torchscript_export_matches_eager(checkpoint):
    root, net = checkpoint
    _export("ckpt_export", root, root / "model.ts", "--use_trace", "True")
    scripted = torch.jit.load(str(root / "model.ts"), map_location="cpu")
    for shape in ((1, 1, 64, 64), (3, 1, 96, 80)):  # the traced net takes other batch and slice sizes
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            out = scripted(x).numpy()
        assert out.shape == (shape[0], 4, *shape[2:])
        np.testing.assert_allclose(out, _eager(net, x), rtol=0, atol=ATOL)


def test_onnx_export_runs_in_onnxruntime_and_matches_eager(checkpoint):
    ort = pytest.importorskip("onnxruntime")
    root, net = checkpoint
    # the TorchScript-based exporter (dynamo False) keeps batch and slice size dynamic; the dynamo
    # one refuses these dynamic_axes. A Python literal: the CLI reads it so, and JSON has no int keys.
    axes = {0: "batch", 2: "height", 3: "width"}
    kwargs = {"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": {"image": axes, "pred": axes}}
    _export("onnx_export", root, root / "model.onnx", "--use_trace", "True",
            "--converter_kwargs", repr({**kwargs, "dynamo": False}))  # fmt: skip
    session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for shape in ((1, 1, 64, 64), (3, 1, 96, 80)):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
        (out,) = session.run(["pred"], {"image": x.numpy()})
        assert out.shape == (shape[0], 4, *shape[2:])
        np.testing.assert_allclose(out, _eager(net, x), rtol=0, atol=ATOL)
