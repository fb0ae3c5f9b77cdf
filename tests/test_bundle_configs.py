"""The bundle's configs and metadata by the rules the MONAI model zoo checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

from tests.bundle_utils import CONFIGS, REPO, free_port


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


_CHECK = """
import sys
from monai.bundle import ConfigWorkflow
files, workflow_type, root = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
workflow = ConfigWorkflow(config_file=files, meta_file=sys.argv[4], logging_file=sys.argv[5],
                          workflow_type=workflow_type, bundle_root=root)
workflow.initialize()
try:
    missing = workflow.check_properties()
    assert missing in (None, []), missing
    assert workflow.bundle_root == root
finally:
    workflow.finalize()
print("properties ok")
"""


@pytest.mark.parametrize(
    "files, workflow_type",
    [(["train"], "train"), (["train", "multi_gpu_train"], "train"), (["inference"], "infer")],
)
def test_config_workflow_properties(files, workflow_type, tmp_path):
    # in a subprocess: multi_gpu_train's initialize starts a (one-process, gloo) group as torchrun
    # would, and a destroyed group would leave Ignite's distributed state behind in this process
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    paths = ",".join(str(CONFIGS / f"{f}.json") for f in files)
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, paths, workflow_type, str(tmp_path),
         str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "properties ok" in proc.stdout


# what a base config name on a command line stands for: evaluate.json merges after train.json
_BASES = {"train": ["train"], "evaluate": ["train", "evaluate"], "inference": ["inference"]}


def _merges() -> list[tuple[str, str]]:
    """(override, base) for every "merge after a.json, b.json or c.json" an override's _desc_ promises."""
    pairs = []
    for path in sorted(CONFIGS.glob("*.json")):
        desc = json.loads(path.read_text()).get("_desc_", "") if path.name != "metadata.json" else ""
        found = re.search(r"[Mm]erge after ((?:\w+\.json(?:, | or )?)+)", desc)
        if found:
            pairs += [(path.stem, base) for base in re.findall(r"(\w+)\.json", found.group(1))]
    return pairs


@pytest.mark.parametrize("override, base", _merges())
def test_every_override_merges_after_the_configs_it_names(override, base):
    # a "#" key whose parent the base lacks fails at read_config: full_size.json's
    # lr_scheduler#power did after inference.json
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{f}.json") for f in _BASES[base] + [override]])
    net = parser.get_parsed_content("network_def", instantiate=True)
    assert isinstance(net, torch.nn.Module)
    if override == "full_size":
        assert parser["network_def"]["features"] == [64, 128, 256, 512, 1024] and parser["roi_size"] == [224, 224]
        if base == "train":
            assert parser.get_parsed_content("lr_scheduler").power == 0.0


def test_merges_cover_every_override():
    named = {o for o, _ in _merges()}
    assert {p.stem for p in CONFIGS.glob("*.json")} - {"train", "inference", "metadata"} <= named


def test_runner_names_alias_run():
    for files, alias in ((["train"], "training"), (["train", "evaluate"], "evaluating"), (["inference"], "inference")):
        merged = {}
        for f in files:
            merged.update(json.loads((CONFIGS / f"{f}.json").read_text()))
        assert merged[alias] == "@run"


def test_verify_bundle_script_passes_every_check():
    weights = REPO / "bundle" / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip(f"no shipped weights at {weights}")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "verify_bundle.py"), str(REPO / "bundle")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines), proc.stdout
    assert "7 of 7 checks passed" in proc.stdout


@pytest.mark.parametrize(
    "given, expected",
    [("false", False), ("False", False), ("0", False), ("true", True), ("TRUE", True), (False, False), (True, True)],
)
def test_switches_given_on_the_command_line_reach_the_engines_as_booleans(given, expected):
    # `--amp false` arrives as the text 'false', which Python counts as true
    train = ConfigParser()
    train.read_config([str(CONFIGS / "train.json")])
    infer = ConfigParser()
    infer.read_config([str(CONFIGS / "inference.json")])
    for parser in (train, infer):
        parser["amp"] = parser["compile"] = given
    for parser, engine in ((train, "train#trainer"), (train, "validate#evaluator"), (infer, "evaluator")):
        assert parser.get_parsed_content(f"{engine}#amp") is expected
        assert parser.get_parsed_content(f"{engine}#compile") is expected
    if not expected:  # (resuming for real needs a checkpoint on disk: tests/test_reliability.py)
        train["resume"] = given
        assert train.get_parsed_content("train#resume_loader#load_path") == train.get_parsed_content("ckpt_path")


def test_a_misspelt_switch_is_an_error_that_names_it():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser["amp"] = "ture"
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("train#trainer#amp")
    assert "amp must be true or false, got 'ture'" in str(raised.value.__cause__)


def test_network_switches_given_as_text_build_the_network_asked_for():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser["network_def#use_rfb"] = "false"
    parser["network_def#side_outputs"] = "False"
    parser["network_def#channels_last"] = "false"
    net = parser.get_parsed_content("network_def", instantiate=True)
    assert not any(type(m).__name__ == "RFB" for m in net.modules())
    assert len(net.side.convs) == 0
    assert not net.channels_last
