"""The bundle's configs and metadata by the rules the MONAI model zoo checks."""

from __future__ import annotations

import json
import socket

import pytest
from monai.bundle import ConfigWorkflow, verify_metadata

from tests.bundle_utils import CONFIGS, REPO

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_every_config_is_json_indented_by_4(name):
    text = (CONFIGS / name).read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n"


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"model-zoo schema copy not found at {SCHEMA}")
def test_metadata_passes_the_model_zoo_schema():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert set(fmt["inputs"]) == {"image"} and set(fmt["outputs"]) == {"pred"}
    train = json.loads((CONFIGS / "train.json").read_text())
    assert list(fmt["outputs"]["pred"]["channel_def"].values()) == train["class_names"]


@pytest.mark.parametrize(
    "files, workflow_type",
    [(["train"], "train"), (["train", "multi_gpu_train"], "train"), (["inference"], "infer")],
)
def test_config_workflow_properties(files, workflow_type, tmp_path, monkeypatch):
    # multi_gpu_train's initialize starts a (one-process, gloo) group as torchrun would
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f"{f}.json") for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(tmp_path),
    )
    workflow.initialize()
    try:
        assert workflow.check_properties() in (None, [])
        assert workflow.bundle_root == str(tmp_path)
    finally:
        workflow.finalize()


def test_runner_names_alias_run():
    for files, alias in ((["train"], "training"), (["train", "evaluate"], "evaluating"), (["inference"], "inference")):
        merged = {}
        for f in files:
            merged.update(json.loads((CONFIGS / f"{f}.json").read_text()))
        assert merged[alias] == "@run"
