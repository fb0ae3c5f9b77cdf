"""Requests from MONAI Label are typed and refused before any value reaches the config parser
(mgrad_net.serving); the real server is tested in test_monailabel.py."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

from mgrad_net.serving import RequestError, check_infer_request, check_train_request, refuse_expressions

FORWARDED = (
    "max_epochs", "val_split", "pretrained", "multi_gpu", "force_multi_gpu", "run_id", "gpus", "device",
    "tracking", "tracking_uri", "tracking_experiment_name", "tracking_run_name", "model_filename",
)  # fmt: skip


@pytest.fixture
def models(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    return tmp_path


def _payload(marker) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).touch()"


def test_the_parser_would_run_the_payload_it_is_refused_in_every_forwarded_field(tmp_path, models):
    marker = tmp_path / "ran"
    parser = ConfigParser({"max_epochs": _payload(marker)})
    parser.get_parsed_content("max_epochs")  # what MONAI Label's overrides would do
    assert marker.exists()
    marker.unlink()
    for field in FORWARDED:
        for value in (_payload(marker), [_payload(marker)], {"_target_": "os.system"}, " @network"):
            with pytest.raises(RequestError, match=f"request field '{field}"):
                check_train_request({"model": "mgrad_unet", field: value}, models, ["mgrad_unet"])
    assert not marker.exists()


def test_a_train_request_from_monai_labels_client_is_typed(models):
    request = {
        "model": "mgrad_unet", "max_epochs": "3", "val_split": 0.2, "pretrained": "true", "multi_gpu": False,
        "run_id": "", "gpus": "all", "device": ["cpu", "cuda"], "tracking": ["None", "mlflow"],
        "tracking_uri": "/tmp/mlruns", "tracking_experiment_name": "", "model_filename": ["model.pt"],
        "bundle_path": "/srv/bundle", "client_id": "slicer 5.6",
    }  # fmt: skip
    typed = check_train_request(request, models, ["mgrad_unet"])
    assert typed["max_epochs"] == 3 and typed["pretrained"] is True and typed["device"] == "cpu"
    assert typed["model_filename"] == "model.pt" and typed["tracking"] == "None"
    assert typed["client_id"] == "slicer 5.6"  # not forwarded by MONAI Label; free of expressions


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("max_epochs", 0, "outside 1..100000"),
        ("max_epochs", "1e9", "expected an integer"),
        ("max_epochs", True, "expected an integer"),
        ("val_split", 1.5, "0 <= split < 1"),
        ("pretrained", "maybe", "expected true or false"),
        ("run_id", "finalize", "expected one of"),
        ("gpus", "0;rm", "GPU indices"),
        ("device", "cuda:0 ; x", "expected cpu, cuda or cuda:N"),
        ("tracking", "wandb", "expected None or mlflow"),
        ("tracking_run_name", "../x", "plain name"),
        ("model_filename", "../../etc/passwd.pt", "base name"),
        ("model_filename", "/abs/model.pt", "base name"),
        ("model_filename", "other.pt", "not a .pt file in"),
        ("model", "other", "no trainer 'other'"),
    ],
)
def test_a_train_request_field_of_the_wrong_kind_is_refused_by_name(models, field, value, reason):
    with pytest.raises(RequestError, match=reason) as err:
        check_train_request({"model": "mgrad_unet", field: value}, models, ["mgrad_unet"])
    assert err.value.field == field


def test_an_infer_request_is_checked_as_well(models):
    typed = check_infer_request({"model": "mgrad_unet", "device": "cpu", "sw_batch_size": "4"}, models)
    assert typed["sw_batch_size"] == 4
    for request in (
        {"device": "$x"},
        {"result_extension": "%x"},
        {"model_filename": "../model.pt"},
        {"a": {"b": ["@c"]}},
    ):
        with pytest.raises(RequestError):
            check_infer_request({"model": "mgrad_unet", **request}, models)


def test_refuse_expressions_walks_nested_values_and_keys():
    refuse_expressions({"image": "/data/a$b.nii.gz", "n": [1, 2.0, None, True]}, "ok")  # a '$' inside is text
    for bad in ({"$k": 1}, {"x": [{"y": "%macro"}]}, {"x": {"_requires_": []}}, ["  $ spaced"]):
        with pytest.raises(RequestError):
            refuse_expressions(bad, "request")
