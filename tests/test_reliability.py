"""Reliability: a user's weights are kept, a NaN loss stops training before the step, runs repeat."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.data.meta_tensor import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointLoader
from monai.utils import set_determinism

from mgrad_net.data import synthetic_disks
from mgrad_net.engines import FeedbackTrainer
from mgrad_net.handlers import StopOnNonFiniteLoss
from mgrad_net.io import keep_previous
from mgrad_net.losses import MGRADLoss
from tests.conftest import tiny_net


def test_keep_previous_copies_the_weights_a_run_will_replace(tmp_path):
    assert keep_previous(tmp_path / "model.pt") is None
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"the user's weights")
    kept = keep_previous(weights)
    assert kept.name.startswith("model_before_") and kept.suffix == ".pt"
    assert kept.read_bytes() == weights.read_bytes() == b"the user's weights"


def _trainer(net, items, handlers=(), passes=3):
    return FeedbackTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=DataLoader(items, batch_size=2),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 1e-3),
        loss_function=MGRADLoss(),
        feedback_passes=passes,
        train_handlers=list(handlers),
    )


def test_nan_loss_stops_before_the_step_and_keeps_the_last_good_state(tmp_path):
    items = synthetic_disks(4, seed=3)
    for i, item in enumerate(items):
        image = torch.as_tensor(item["image"])
        if i == 3:
            image[0, 0, 0] = float("nan")  # the second batch goes bad
        item["image"] = MetaTensor(image, meta={"filename_or_obj": f"/data/case{i}.nii.gz"})
    net = tiny_net(out_channels=2)
    trainer = _trainer(net, items)
    stop = StopOnNonFiniteLoss(str(tmp_path), {"model": net, "optimizer": trainer.optimizer})
    stop.attach(trainer)
    params_after_first_batch = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: params_after_first_batch.update({k: v.clone() for k, v in net.state_dict().items()})
    )
    with pytest.raises(FloatingPointError) as err:
        trainer.run()
    message = str(err.value)
    assert "iteration 2, feedback pass 1, epoch 1" in message
    assert "/data/case2.nii.gz, /data/case3.nii.gz" in message
    saved = torch.load(tmp_path / "last_good.pt", weights_only=True)
    for name, value in params_after_first_batch.items():
        torch.testing.assert_close(saved["model"][name], value, rtol=0, atol=0)
    for name, value in net.named_parameters():
        assert torch.isfinite(value).all(), name  # the NaN never reached the weights
    assert set(saved) == {"model", "optimizer"}


def test_two_seeded_cpu_runs_give_identical_losses():
    losses = []
    for _ in range(2):
        set_determinism(seed=0)
        net = tiny_net(out_channels=2)
        trainer = _trainer(net, synthetic_disks(4, seed=1))
        history = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.extend(float(x) for x in e.state.pass_losses))
        trainer.run()
        losses.append(history)
    set_determinism(seed=None)
    assert len(losses[0]) == 2 * 2 * 3
    assert losses[0] == losses[1]


class _Payload:
    """A "checkpoint" that runs a shell command when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "model.pt"
    torch.save({"model": _Payload(str(marker))}, evil)
    net = tiny_net(out_channels=2)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(synthetic_disks(2, seed=0), batch_size=2),
        network=net,
        val_handlers=[CheckpointLoader(load_path=str(evil), load_dict={"model": net}, map_location="cpu")],
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        evaluator.run()
    assert not marker.exists()
