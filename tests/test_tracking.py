"""Experiment tracking: ``--tracking mlflow`` on a real two-iteration training, read back with MLflow's client.

MONAI's default MLflow settings (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``) keep the store
local: a SQLite file ``<output_dir>/mlruns.db`` (MLflow 3.13+ refuses the plain ``mlruns/``
file store) with the run's artifacts in ``<output_dir>/mlruns/``.
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient  # in the "test" extra: a missing mlflow fails, not skips
from monai.utils import path_to_sqlite_uri

from mgrad_net.handlers import read_training_log
from tests.bundle_utils import run_bundle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """12 synthetic training volumes in batches of 6: two iterations, then one validation."""
    root = tmp_path_factory.mktemp("tracked")
    proc = run_bundle(
        "training", ["train"], root,
        "--max_epochs", "1", "--train#dataloader#batch_size", "6", "--train#slices_per_volume", "1",
        "--tracking", "mlflow",
    )  # fmt: skip
    return root, proc


def _client(root) -> MlflowClient:
    store = root / "eval" / "mlruns.db"
    assert store.is_file(), f"no local MLflow store at {store}"
    return MlflowClient(tracking_uri=path_to_sqlite_uri(str(store)))


def _the_run(client):
    experiment = client.get_experiment_by_name("monai_experiment")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "trainer and validator must log into one run"
    return runs[0]


def test_the_run_is_in_the_local_store_and_finished(tracked_run):
    root, _ = tracked_run
    run = _the_run(_client(root))
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "1"
    assert run.data.params["epoch_length"] == "2"


def test_train_loss_per_iteration_and_validation_dice_are_logged(tracked_run):
    root, _ = tracked_run
    client = _client(root)
    run = _the_run(client)
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [1, 2]
    assert all(math.isfinite(m.value) and m.value > 0 for m in loss)
    lr = client.get_metric_history(run.info.run_id, "lr_group_0")
    assert [m.value for m in lr] == pytest.approx([0.003, 0.003])  # the configured learning_rate
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1]  # one validation, after epoch 1
    assert 0.0 <= dice[0].value <= 1.0
    # the same number the console and the training log report
    log = read_training_log(root / "eval" / "training_log.csv")
    assert len(log) == 1
    assert float(log[0]["val_mean_dice"]) == pytest.approx(dice[0].value)


def test_the_executed_config_is_an_artifact_of_the_run(tracked_run, tmp_path):
    root, _ = tracked_run
    client = _client(root)
    run = _the_run(client)
    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    configs = [n for n in names if n.startswith("config_") and n.endswith(".json")]
    assert len(configs) == 1, names
    local = client.download_artifacts(run.info.run_id, configs[0], str(tmp_path))
    executed = json.loads(open(local).read())
    # the config as run: the command line's overrides included
    assert executed["network_def"]["features"] == [4, 8, 16, 32, 64]
    assert executed["max_epochs"] == 1
    assert executed["train"]["dataloader"]["batch_size"] == 6
