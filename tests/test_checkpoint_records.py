"""mgrad_net.checkpoints.describe: a checkpoint says what it holds, and inference, evaluation and
fine-tuning read it: weights of another width, size and class set run with ``--ckpt_path`` alone."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from monai.bundle import ConfigParser

from mgrad_net.checkpoints import RunRecord, network_from_record, with_records
from mgrad_net.config import parse_switches
from mgrad_net.errors import CheckpointError
from mgrad_net.networks import MGRADUNet
from tests.bundle_utils import config_files

NARROW = {"features": [8, 16, 32, 64, 128], "decoder_channels": 8}
CLASSES = ["background", "liver", "tumour"]


def _weights(path, roi_size=(96, 96), class_names=CLASSES, **widths):
    """An MGRAD-UNet of ``widths`` saved as training saves ``model.pt``: its state dict, with the
    run's record in the metadata."""
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": len(class_names), **(widths or NARROW)}
    network = parse_switches(MGRADUNet)(**args)
    state = network.state_dict()
    torch.save(with_records(state, {"record": RunRecord(network, list(roi_size), class_names)}), path)
    return network


def _parsed(names, ckpt_path, **overrides):
    parser = ConfigParser()
    parser.read_config(config_files(*names))
    parser["ckpt_path"] = str(ckpt_path)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("names", [("inference",), ("train", "evaluate")])
def test_weights_of_another_width_size_and_classes_run_with_ckpt_path_alone(tmp_path, names, caplog):
    saved = _weights(tmp_path / "model.pt")
    parser = _parsed(names, tmp_path / "model.pt")
    assert parser.get_parsed_content("roi_size") == [96, 96]
    assert parser.get_parsed_content("class_names") == CLASSES and parser.get_parsed_content("num_classes") == 3
    network = parser.get_parsed_content("network_def")
    assert network.init_args["features"] == NARROW["features"] and network.init_args["out_channels"] == 3
    network.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict: every tensor fits
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), saved.state_dict().values()))
    assert "its record" in caplog.text and "features=[8, 16, 32, 64, 128]" in caplog.text
    # the config's choices that leave the weights alone stay the config's
    parser = _parsed(names, tmp_path / "model.pt", **{"network_def#inference_passes": 3, "roi_size": [64, 64]})
    assert parser.get_parsed_content("network_def").inference_passes == 3
    assert parser.get_parsed_content("roi_size") == [64, 64]  # a size on the command line wins


def test_weights_without_a_record_run_with_the_configs_network(tmp_path):
    network = MGRADUNet(2, 1, 4)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    parser = _parsed(["inference"], tmp_path / "model.pt")
    assert parser.get_parsed_content("roi_size") == [224, 224]
    assert parser.get_parsed_content("network_def").init_args["features"] == [16, 32, 64, 128, 256]


def test_a_new_training_run_builds_its_config_whatever_the_weights_in_ckpt_dir_hold(tmp_path):
    _weights(tmp_path / "model.pt")
    parser = _parsed(["train"], tmp_path / "model.pt")
    assert parser.get_parsed_content("roi_size") == [224, 224]
    assert parser.get_parsed_content("network_def").init_args["features"] == [16, 32, 64, 128, 256]


def test_fine_tuning_builds_the_recorded_widths_with_the_runs_own_classes(tmp_path):
    _weights(tmp_path / "model.pt")
    two = ["background", "left atrium"]
    parser = _parsed(["train"], tmp_path / "model.pt", finetune=True, class_names=two)
    network = parser.get_parsed_content("network_def")
    assert network.init_args["features"] == NARROW["features"] and network.init_args["out_channels"] == 2
    assert parser.get_parsed_content("roi_size") == [96, 96]


@pytest.mark.parametrize("target", ["os.system", "mgrad_net.config.parse_switches", "builtins.eval"])
def test_a_record_never_chooses_code_outside_the_network_classes(tmp_path, target):
    with pytest.raises(CheckpointError, match="model.pt"):
        network_from_record({"network": target, "network_args": {"command": "touch x"}}, str(tmp_path / "model.pt"))


def test_a_mismatch_is_named_from_the_record_not_guessed_from_parameter_names(tmp_path):
    from mgrad_net.checkpoints import check_weights

    _weights(tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        check_weights(tmp_path / "model.pt", parse_switches(MGRADUNet)(spatial_dims=2, in_channels=1, out_channels=3))
    message = str(err.value)
    assert "its record" in message and "features=[8, 16, 32, 64, 128]" in message and "\n" not in message
    plain = OrderedDict(MGRADUNet(2, 1, 3, **NARROW).state_dict())
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no record of the network it holds"):
        check_weights(tmp_path / "plain.pt", MGRADUNet(2, 1, 3))


def test_weights_missing_from_the_repository_root_say_what_to_pass(tmp_path, monkeypatch):
    from mgrad_net.checkpoints import load_checkpoint

    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the repository root, bundle_root "." as the configs default it
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("./models/model.pt", "weights")
    assert str(err.value) == (
        "weights models/model.pt does not exist (this is the repository root: pass --bundle_root bundle, or run "
        "from bundle/)."
    )
    monkeypatch.chdir(tmp_path / "bundle")
    with pytest.raises(CheckpointError, match=r"^weights models/model.pt does not exist\.$"):
        load_checkpoint("./models/model.pt", "weights")
