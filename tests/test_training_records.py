"""TrainingLog and BestMetricRecord on real MONAI trainers and evaluators, with real files.

The validation networks here are fixed functions of the image, so every Dice is known exactly.
"""

from __future__ import annotations

import time

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    CheckpointSaver,
    LrScheduleHandler,
    MeanDice,
    ValidationHandler,
    from_engine,
)
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose

from mgrad_net.handlers import TRAINING_LOG_FIELDS, BestMetricRecord, TrainingLog, read_training_log

CPU = torch.device("cpu")


class _Copy(torch.nn.Module):
    """Predicts class 1 exactly where the image is 1, class 0 elsewhere, never class 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 10 * (x == 1).float(), torch.zeros_like(x)], dim=1)


def _set_threshold(net: torch.nn.Conv2d, t: float) -> None:
    """Class 1 where the image exceeds ``t``; the threshold is readable back from the weights (bias −100·t)."""
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 100.0]).reshape(2, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -100.0 * t]))


def _threshold_net(t: float) -> torch.nn.Conv2d:
    net = torch.nn.Conv2d(1, 2, 1)
    _set_threshold(net, t)
    return net


def _ramp_case() -> list[dict]:
    """A 16×16 left-to-right ramp ((column + 0.5) / 16), class 1 in its right half (8 columns).

    A threshold of 0.5 finds it exactly; 0.1, 0.2 and 0.3 predict 14, 13 and 11 columns:
    Dice 16/22, 16/21 and 16/19.
    """
    ramp = ((torch.arange(16) + 0.5) / 16).expand(1, 16, 16).contiguous()
    return [{"image": ramp, "label": (ramp > 0.5).long()}]


def _evaluator(network: torch.nn.Module, items: list[dict], classes: int, handlers=()) -> SupervisedEvaluator:
    return SupervisedEvaluator(
        device=CPU,
        val_data_loader=DataLoader(items, batch_size=1),
        network=network,
        postprocessing=Compose(
            [AsDiscreted(keys="pred", argmax=True, to_onehot=classes), AsDiscreted(keys="label", to_onehot=classes)]
        ),
        key_val_metric={
            "val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
        val_handlers=list(handlers),
    )


def _training_items(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {"image": torch.rand(1, 8, 8, generator=g), "label": torch.randint(0, 3, (1, 8, 8), generator=g)}
        for _ in range(n)
    ]


def _trainer(network: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int, handlers) -> SupervisedTrainer:
    """Two iterations per epoch (4 items, batch 2)."""
    return SupervisedTrainer(
        device=CPU,
        max_epochs=epochs,
        train_data_loader=DataLoader(_training_items(), batch_size=2),
        network=network,
        optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=list(handlers),
    )


def _validation_items() -> list[dict]:
    """Two cases: the first has classes 1 and 2, the second only class 1 (its class-2 Dice is NaN)."""
    first, second = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    first[:, :3, :3] = 1
    first[:, 5:, 5:] = 2
    second[:, 2:6, 2:6] = 1
    # the image shows class 1 only: _Copy finds it and misses class 2
    return [{"image": (lab == 1).float(), "label": lab} for lab in (first, second)]


def test_rows_per_epoch_with_lr_loss_and_validation_of_that_epoch(tmp_path):
    log_path = tmp_path / "eval" / "training_log.csv"
    validator = _evaluator(_Copy(), _validation_items(), classes=3)
    validator.add_event_handler(Events.COMPLETED, lambda _: time.sleep(0.5))  # a validation that takes time
    net = torch.nn.Conv2d(1, 3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    losses: dict[int, list[float]] = {}
    rows_seen: list[int] = []
    trainer = _trainer(
        net, optimizer, epochs=4,
        handlers=[
            LrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)),
            ValidationHandler(validator=validator, interval=2, epoch_level=True),  # epochs 2 and 4
            TrainingLog(str(log_path), validator, class_names=["a", "b"], optimizer=optimizer),
        ],
    )  # fmt: skip
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: losses.setdefault(e.state.epoch, []).append(float(e.state.output[0]["loss"])),
    )
    # attached after the TrainingLog: the file as it stands when each epoch ends
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: rows_seen.append(len(read_training_log(log_path))))
    trainer.run()

    assert rows_seen == [1, 2, 3, 4]  # one row more each epoch, earlier ones kept
    assert sorted(p.name for p in log_path.parent.iterdir()) == ["training_log.csv"]  # no temporary files left
    with log_path.open() as f:
        assert f.readline().strip().split(",") == [*TRAINING_LOG_FIELDS, "val_dice_a", "val_dice_b"]
    rows = read_training_log(log_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["iterations"]) for r in rows] == [2, 4, 6, 8]
    assert [float(r["lr"]) for r in rows] == [0.1, 0.05, 0.025, 0.0125]  # as each epoch started
    for r in rows:
        epoch_losses = losses[int(r["epoch"])]
        assert float(r["loss"]) == pytest.approx(sum(epoch_losses) / len(epoch_losses), rel=1e-12)
        assert 0 < float(r["train_seconds"]) <= float(r["seconds"])
    for r in (rows[0], rows[2]):  # not validated: empty, not the previous validation's numbers
        assert [r[k] for k in ("val_mean_dice", "best_val_mean_dice", "val_dice_a", "val_dice_b")] == [""] * 4
    for r in (rows[1], rows[3]):
        assert float(r["seconds"]) - float(r["train_seconds"]) >= 0.5  # validation: in seconds, not in train_seconds
        # case 1: class a 1.0, class b 0.0 (missed); case 2: a 1.0, b undefined (absent from the ground truth);
        # MONAI's mean: over each case's defined classes, then over the cases
        assert float(r["val_mean_dice"]) == pytest.approx((0.5 + 1.0) / 2)
        assert float(r["best_val_mean_dice"]) == pytest.approx((0.5 + 1.0) / 2)
        assert float(r["val_dice_a"]) == 1.0
        assert float(r["val_dice_b"]) == 0.0  # the mean over the case where it is defined


def test_best_column_follows_the_validators_best(tmp_path):
    """Validation scores that rise, fall, rise: the best column is the running maximum."""
    thresholds = [0.1, 0.3, 0.2, 0.5]  # one per epoch's validation
    net = torch.nn.Conv2d(1, 2, 1)
    validator = _evaluator(net, _ramp_case(), classes=2)
    validator.add_event_handler(Events.STARTED, lambda e: _set_threshold(net, thresholds[e.state.epoch]))
    trainer_net, log = torch.nn.Conv2d(1, 3, 1), tmp_path / "log.csv"
    validation = ValidationHandler(validator=validator, interval=1, epoch_level=True)
    optimizer = torch.optim.SGD(trainer_net.parameters(), lr=0.01)
    _trainer(trainer_net, optimizer, 4, [validation, TrainingLog(str(log), validator)]).run()
    rows = read_training_log(log)
    assert [float(r["val_mean_dice"]) for r in rows] == pytest.approx([16 / 22, 16 / 19, 16 / 21, 1.0])
    assert [float(r["best_val_mean_dice"]) for r in rows] == pytest.approx([16 / 22, 16 / 19, 16 / 19, 1.0])
    assert not any(k.startswith("val_dice_") for k in rows[0])  # no class names: no per-class columns


def test_a_resumed_run_continues_the_log_and_a_new_run_replaces_it(tmp_path):
    log, ckpt = tmp_path / "training_log.csv", tmp_path / "ckpt"

    def run(lr: float, epochs: int, resume_from: str | None = None) -> None:
        net = torch.nn.Conv2d(1, 3, 1)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        trainer = _trainer(net, optimizer, epochs, [TrainingLog(str(log), optimizer=optimizer)])
        objects = {"trainer": trainer, "model": net}
        CheckpointSaver(str(ckpt), objects, save_interval=1, epoch_level=True).attach(trainer)
        if resume_from is not None:
            CheckpointLoader(str(ckpt / resume_from), objects).attach(trainer)
        trainer.run()

    run(lr=0.1, epochs=3)
    first = read_training_log(log)
    assert [(r["epoch"], r["lr"]) for r in first] == [("1", "0.1"), ("2", "0.1"), ("3", "0.1")]
    assert first[0]["val_mean_dice"] == ""  # no validator: the validation columns stay empty

    run(lr=0.2, epochs=3, resume_from="checkpoint_epoch=1.pt")  # epochs 2 and 3 again
    resumed = read_training_log(log)
    assert resumed[0] == first[0]  # the kept epoch, unchanged
    assert [(r["epoch"], r["iterations"], r["lr"]) for r in resumed[1:]] == [("2", "4", "0.2"), ("3", "6", "0.2")]

    run(lr=0.3, epochs=1)  # a new run from epoch 1
    assert [(r["epoch"], r["lr"]) for r in read_training_log(log)] == [("1", "0.3")]


def _validate(
    save_dir, threshold: float, epoch: int, state: dict | None = None
) -> tuple[BestMetricRecord, SupervisedEvaluator]:
    """One validation at ``epoch`` in a fresh evaluator and best-weights saver, as a new process would
    have them; ``state``: a saved record to restore first (``None``: no record restored)."""
    net = _threshold_net(threshold)
    saver = CheckpointSaver(str(save_dir), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    evaluator = _evaluator(net, _ramp_case(), classes=2, handlers=[saver])
    record = BestMetricRecord(evaluator, saver, filename="model.pt")
    if state is not None:
        record.load_state_dict(state)
    evaluator.run(global_epoch=epoch)
    return record, evaluator


def _saved_threshold(save_dir) -> float:
    return -float(torch.load(save_dir / "model.pt", weights_only=True)["bias"][1]) / 100


def test_best_metric_record_saves_and_restores_the_best_validation(tmp_path):
    net = _threshold_net(0.5)
    fresh = BestMetricRecord(_evaluator(net, _ramp_case(), 2), CheckpointSaver(str(tmp_path), {"model": net}))
    assert fresh.state_dict() == {"best_metric": -1.0, "best_metric_epoch": -1}  # nothing validated yet

    record, _ = _validate(tmp_path, threshold=0.3, epoch=1)
    assert record.state_dict() == {"best_metric": pytest.approx(16 / 19), "best_metric_epoch": 1}
    torch.save({"best": record.state_dict()}, tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["best"]  # plain numbers: loads safely

    # resumed: a worse validation neither becomes the best nor replaces model.pt
    record, evaluator = _validate(tmp_path, threshold=0.1, epoch=2, state=state)
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(16 / 22)
    assert record.state_dict() == {"best_metric": pytest.approx(16 / 19), "best_metric_epoch": 1}
    assert _saved_threshold(tmp_path) == pytest.approx(0.3)

    # a better one replaces it, under the same name
    record, _ = _validate(tmp_path, threshold=0.5, epoch=3, state=record.state_dict())
    assert record.state_dict() == {"best_metric": 1.0, "best_metric_epoch": 3}
    assert _saved_threshold(tmp_path) == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.pt"]


def test_without_the_record_a_resumed_run_would_replace_the_best_weights(tmp_path):
    """What the record prevents: a fresh saver takes a worse first validation as the best."""
    _validate(tmp_path, threshold=0.3, epoch=1)
    _validate(tmp_path, threshold=0.1, epoch=2)
    assert _saved_threshold(tmp_path) == pytest.approx(0.1)


def test_a_record_saved_before_any_validation_leaves_the_saver_empty(tmp_path):
    unvalidated = {"best_metric": -1.0, "best_metric_epoch": -1}
    record, _ = _validate(tmp_path, threshold=0.1, epoch=1, state=unvalidated)
    assert record.state_dict() == {"best_metric": pytest.approx(16 / 22), "best_metric_epoch": 1}
    assert _saved_threshold(tmp_path) == pytest.approx(0.1)  # the first validation is the best so far


def test_a_resumed_run_whose_best_weights_file_is_gone_starts_the_record_afresh(tmp_path, caplog):
    record, _ = _validate(tmp_path, threshold=0.3, epoch=1)
    state = record.state_dict()
    (tmp_path / "model.pt").unlink()  # removed by hand between the runs
    # even a worse validation is now the best there is: it is written, and the record is its
    record, _ = _validate(tmp_path, threshold=0.1, epoch=2, state=state)
    assert record.state_dict() == {"best_metric": pytest.approx(16 / 22), "best_metric_epoch": 2}
    assert _saved_threshold(tmp_path) == pytest.approx(0.1)
    assert "model.pt (validation 0.8421, epoch 1) is gone" in caplog.text
