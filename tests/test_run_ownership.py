"""A run's checkpoints belong to that run (issue #43, items 2, 3 and 8): a new run never starts
over an unfinished one, ``--resume`` continues only the run it finds and leaves one checkpoint,
the best-weights record survives a kill between an epoch's two saves, and a run without
validation cases still writes its weights.

Real processes (the bundle as users run it, killed with SIGKILL) and real engines and savers.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler

from mgrad_net.checkpoints import AtomicCheckpointSaver, read_records
from mgrad_net.config import run_training
from mgrad_net.data import write_phantom_dataset
from mgrad_net.handlers import BestMetricRecord, read_training_log
from tests.bundle_utils import bundle_command, run_bundle
from tests.test_training_safety import SMALL, _kill, _last_line, _names, _wait


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoints(models: Path) -> list[str]:
    return [n for n in _names(models) if n.startswith("checkpoint_epoch=")]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_data")
    write_phantom_dataset(root, counts={"training": 2, "validation": 1}, shape=(32, 32, 2))
    return root


@pytest.mark.integration
def test_a_new_run_over_an_unfinished_one_is_refused_and_resume_leaves_one_run(tmp_path, small_data):
    models, log = tmp_path / "models", tmp_path / "first.log"
    data = ["--dataset_dir", str(small_data), *SMALL]
    cmd = bundle_command("training", ["train"], tmp_path, *data, "--max_epochs", "4")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: "checkpoint_epoch=2.pt" in _names(models), proc, log, "epoch 2's checkpoint")
    finally:
        _kill(proc)
    before = {n: _sha(models / n) for n in _names(models) if n.endswith(".pt")}

    # a new run into that folder would leave two runs' checkpoints for --resume to mix: refused, nothing written
    new = run_bundle("training", ["train"], tmp_path, *data, "--max_epochs", "1", check=False)
    last = _last_line(new.stderr)
    assert new.returncode != 0 and "an unfinished training run (epoch 2 of 4)" in last, new.stderr[-3000:]
    assert "checkpoint_epoch=2.pt" in last and "--resume true" in last
    assert {n: _sha(models / n) for n in _names(models) if n.endswith(".pt")} == before

    # --resume continues that run to its end; its earlier checkpoints and the one it resumed are gone
    run_bundle("training", ["train"], tmp_path, *data, "--max_epochs", "4", "--resume", "true")
    assert _checkpoints(models) == ["checkpoint_epoch=4.pt"]
    assert not [n for n in _names(models) if n.startswith("model_before_")], "a resume copied its own model.pt"
    assert [int(r["epoch"]) for r in read_training_log(tmp_path / "eval" / "training_log.csv")] == [1, 2, 3, 4]

    # that run is finished: a new run may start there, and replaces its checkpoint with its own
    run_bundle("training", ["train"], tmp_path, *data, "--max_epochs", "1")
    assert _checkpoints(models) == ["checkpoint_epoch=1.pt"]
    assert torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["max_epochs"] == 1
    assert len([n for n in _names(models) if n.startswith("model_before_")]) == 1  # the finished run's best, kept


class _Scripted(Metric):
    """A validation score read from a list, one value a validation: which epoch is best is the test's choice."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        super().__init__()

    def reset(self) -> None:
        pass

    def update(self, output) -> None:
        pass

    def compute(self) -> float:
        return self.scores.pop(0)


class _Killed(Exception):
    pass


def _run(folder: Path, scores: list[float], kill_after_validation: int | None = None, resume: bool = False):
    net = torch.nn.Conv2d(1, 2, 1)
    batch = [{"image": torch.rand(1, 4, 4), "label": torch.randint(0, 2, (1, 4, 4)).float()}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(batch), network=net,
        key_val_metric={"val_mean_dice": _Scripted(scores)},
    )  # fmt: skip
    best_saver = AtomicCheckpointSaver(
        str(folder), {"model": net}, save_key_metric=True, key_metric_filename="model.pt"
    )
    best_saver.attach(evaluator)
    record = BestMetricRecord(evaluator, best_saver)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=DataLoader(batch), network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=lambda b, d, nb, **kw: (b["image"], b["label"][:, 0].long()),
    )  # fmt: skip
    ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    if kill_after_validation is not None:  # the process dies after model.pt was saved, before the epoch's checkpoint

        @trainer.on(Events.EPOCH_COMPLETED(once=kill_after_validation))
        def _die(engine):
            raise _Killed

    saver = AtomicCheckpointSaver(
        str(folder), {"model": net, "trainer": trainer, "best": record}, save_interval=1, epoch_level=True, n_saved=1
    )
    run_training(trainer, saver, resume=resume)
    return evaluator, net


def test_the_best_weights_survive_a_kill_between_the_epochs_two_saves(tmp_path):
    with pytest.raises(_Killed):
        _run(tmp_path, [0.5, 0.8], kill_after_validation=2)
    weights = tmp_path / "model.pt"
    assert read_records(weights)["best"]["best_metric"] == pytest.approx(0.8)
    kept = _sha(weights)
    assert _checkpoints(tmp_path) == ["checkpoint_epoch=1.pt"]  # its record: best 0.5 at epoch 1

    evaluator, _ = _run(tmp_path, [0.6, 0.7], resume=True)  # epochs 2 and 3 again, both worse than 0.8
    assert evaluator.state.best_metric == pytest.approx(0.8) and evaluator.state.best_metric_epoch == 2
    assert _sha(weights) == kept, "the resumed run replaced the best weights with worse ones"
    assert _checkpoints(tmp_path) == ["checkpoint_epoch=3.pt"]


def test_a_run_without_validation_cases_writes_its_last_weights(tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, counts={"training": 2, "validation": 0}, shape=(32, 32, 2))
    proc = run_bundle("training", ["train"], tmp_path, "--dataset_dir", str(data), "--max_epochs", "2", *SMALL)
    weights = tmp_path / "models" / "model.pt"
    assert weights.is_file(), proc.stderr[-3000:]
    assert "no validation cases" in proc.stderr + proc.stdout
    state = torch.load(weights, weights_only=True)
    resumable = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    for name, tensor in state.items():  # the last epoch's weights, a plain state dict
        torch.testing.assert_close(tensor, resumable["model"][name])
