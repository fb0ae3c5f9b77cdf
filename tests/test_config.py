"""The bundle's config layer (``mgrad_net.config``): command-line switches as booleans, and the
training run's checkpoint handling, on real MONAI engines and on the bundle's own configs."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver, LrScheduleHandler
from monai.losses import DiceCELoss

from mgrad_net.config import parse_switches, run_training
from mgrad_net.engines import TrainingBudget
from mgrad_net.handlers import read_training_log
from mgrad_net.networks import MGRADUNet
from tests.bundle_utils import CONFIGS, config_files

TINY = {"network_def#features": [4, 8, 16, 32, 64], "network_def#decoder_channels": 8, "roi_size": [32, 32]}


@pytest.mark.parametrize(
    "given, expected",
    [("false", False), ("FALSE", False), ("0", False), ("no", False), (0, False), (False, False),
     ("true", True), ("True", True), ("1", True), ("yes", True), (1, True), (True, True)],
)  # fmt: skip
def test_parse_switches_gives_the_network_bools_for_command_line_text(given, expected):
    build = parse_switches(MGRADUNet)
    net = build(out_channels=3, features=(4, 8, 16, 32, 64), decoder_channels=8,
                use_rfb=given, side_outputs=given, channels_last=given)  # fmt: skip
    assert net.channels_last is expected
    assert any(type(m).__name__ == "RFB" for m in net.modules()) is expected
    assert (len(net.side.convs) == 5) is expected


def test_parse_switches_names_a_parameter_given_other_text():
    with pytest.raises(ValueError, match="side_outputs must be true or false, got 'ture'"):
        parse_switches(MGRADUNet)(side_outputs="ture")


def test_parse_switches_leaves_other_arguments_as_given():
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        parse_switches(MGRADUNet)(checkpointing="true")  # text, not a switch: the network's own check


# ---------------------------------------------------------------- run_training on a real trainer


def _trainer(max_epochs: int, lr: float = 0.1, seed: int = 0) -> SupervisedTrainer:
    torch.manual_seed(seed)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.rand(1, 16, 16, generator=g), "label": torch.randint(0, 2, (1, 16, 16), generator=g)}
            for _ in range(4)]  # fmt: skip
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=DataLoader(data, batch_size=2),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
    )  # fmt: skip


def _saver(trainer: SupervisedTrainer, folder: Path) -> CheckpointSaver:
    save_dict = {"model": trainer.network, "optimizer": trainer.optimizer, "trainer": trainer}
    return CheckpointSaver(save_dir=str(folder), save_dict=save_dict, save_interval=1, epoch_level=True, n_saved=1)


def test_run_training_saves_the_resumable_state_each_epoch(tmp_path):
    trainer = _trainer(max_epochs=2)
    run_training(trainer, _saver(trainer, tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=2.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 4


def test_run_training_resumes_from_the_newest_checkpoint(tmp_path):
    first = _trainer(max_epochs=1)
    run_training(first, _saver(first, tmp_path))
    resumed = _trainer(max_epochs=2, seed=5)  # other initial weights: all must come from the file
    # resuming wins over fine-tuning (whose file does not even exist)
    run_training(resumed, _saver(resumed, tmp_path), finetune=True, resume=True, weights=str(tmp_path / "none.pt"))
    assert resumed.state.epoch == 2 and resumed.state.iteration == 4  # 2 iterations an epoch, continued
    uninterrupted = _trainer(max_epochs=2)
    uninterrupted.run()
    for a, b in zip(resumed.network.parameters(), uninterrupted.network.parameters()):
        torch.testing.assert_close(a, b)


def test_run_training_finetunes_from_the_given_weights_only_when_asked(tmp_path):
    start = {"weight": torch.full((2, 1, 3, 3), 0.5), "bias": torch.zeros(2)}
    torch.save(start, tmp_path / "start.pt")
    for finetune in (True, False):
        trainer = _trainer(max_epochs=1, lr=0.0)  # lr 0: the weights stay what training started from
        run_training(trainer, finetune=finetune, weights=str(tmp_path / "start.pt"))
        assert torch.equal(trainer.network.weight, start["weight"]) is finetune


@pytest.mark.parametrize("switch", ["finetune", "resume"])
def test_run_training_refuses_text_switches(switch, tmp_path):
    trainer = _trainer(max_epochs=1)
    with pytest.raises(TypeError, match=f"{switch} must be a bool, got 'false'"):
        run_training(trainer, _saver(trainer, tmp_path), **{switch: "false"}, weights="w.pt")
    assert trainer.state.iteration == 0


def test_run_training_resume_without_a_checkpoint_names_the_folder(tmp_path):
    trainer = _trainer(max_epochs=1)
    with pytest.raises(FileNotFoundError, match=f"nothing to resume: {tmp_path}"):
        run_training(trainer, _saver(trainer, tmp_path), resume=True)


def _budgeted(trainer: SupervisedTrainer, folder: Path, budget: TrainingBudget) -> tuple[CheckpointSaver, object]:
    """``trainer`` wired as train.json wires it: the budget before a polynomial schedule's
    handler, the budget and the schedule in the resumable checkpoint. Every epoch counts one
    second of training (ignite's measurement replaced before the budget reads it, so the test
    holds on a loaded machine)."""
    scheduler = torch.optim.lr_scheduler.PolynomialLR(trainer.optimizer, total_iters=trainer.state.max_epochs)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.times.update(EPOCH_COMPLETED=1.0))
    budget.lr_scheduler = scheduler
    budget.attach(trainer)
    LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    saver = _saver(trainer, folder)
    saver.save_dict.update(lr_scheduler=scheduler, budget=budget)
    return saver, scheduler


def test_a_resumed_run_keeps_its_training_budget_and_schedule(tmp_path, caplog):
    first = _trainer(max_epochs=10)
    budget = TrainingBudget(5 / 60)  # 5 one-second epochs fit
    saver, _ = _budgeted(first, tmp_path, budget)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())  # killed after epoch 2
    run_training(first, saver)
    assert first.state.max_epochs == 5 and first.state.epoch == 2

    resumed = _trainer(max_epochs=10)  # the command line's max_epochs again, as in the first run
    again = TrainingBudget(1e6 / 60)  # another budget on the command line: the run's own is kept
    saver, scheduler = _budgeted(resumed, tmp_path, again)
    with caplog.at_level(logging.WARNING, logger="mgrad_net"):
        run_training(resumed, saver, resume=True)
    assert "resuming a run whose training budget is 0.1 min: that budget is kept" in caplog.text
    assert resumed.state.epoch == resumed.state.max_epochs == 5 == again.fit == scheduler.total_iters
    assert again.epochs == 5 and again.spent == pytest.approx(5.0)  # the first run's time carried on
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ended with it


def test_a_resumed_run_whose_budget_is_spent_trains_no_further(tmp_path):
    first = _trainer(max_epochs=3)
    saver, _ = _budgeted(first, tmp_path, TrainingBudget(1.0))
    run_training(first, saver)
    ckpt = tmp_path / "checkpoint_epoch=3.pt"
    state = torch.load(ckpt, weights_only=True)
    state["budget"]["spent"] = 61.0  # a minute's budget, spent (the run itself stopped at max_epochs)
    torch.save(state, ckpt)
    resumed = _trainer(max_epochs=10)
    saver, _ = _budgeted(resumed, tmp_path, TrainingBudget(1.0))
    run_training(resumed, saver, resume=True)
    assert resumed.state.iteration == state["trainer"]["iteration"]  # not one more step
    for a, b in zip(resumed.network.parameters(), first.network.parameters()):
        torch.testing.assert_close(a, b)


def test_a_checkpoint_from_before_the_budget_was_saved_still_resumes(tmp_path, caplog):
    first = _trainer(max_epochs=1)
    saver, _ = _budgeted(first, tmp_path, TrainingBudget(1e6 / 60))
    del saver.save_dict["budget"]  # saved as before 0.8.3
    run_training(first, saver)
    resumed = _trainer(max_epochs=2)
    saver, _ = _budgeted(resumed, tmp_path, TrainingBudget(1e6 / 60))
    with caplog.at_level(logging.WARNING, logger="mgrad_net"):
        run_training(resumed, saver, resume=True)
    assert resumed.state.epoch == 2
    assert f"{tmp_path / 'checkpoint_epoch=1.pt'} holds no training-budget state" in caplog.text


# ---------------------------------------------------------------- the bundle's configs, switches as text


def _volume(path: Path, rng: np.random.RandomState, label: bool) -> None:
    data = np.zeros((32, 32, 3), np.uint8) if label else rng.rand(32, 32, 3).astype(np.float32)
    if label:
        for cls, (y, x) in enumerate([(8, 8), (8, 22), (22, 15)], start=1):
            data[y - 4 : y + 4, x - 4 : x + 4] = cls
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Two training and one validation volume of 32×32×3 as NIfTI pairs."""
    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.RandomState(0)
    for section, names in (("training", ["a", "b"]), ("validation", ["c"])):
        (root / section).mkdir()
        for name in names:
            _volume(root / section / f"{name}.nii.gz", rng, label=False)
            _volume(root / section / f"{name}_gt.nii.gz", rng, label=True)
    return root


def _train(root: Path, data: Path, **switches: object) -> ConfigWorkflow:
    """The bundle's training workflow, as ``python -m monai.bundle run training`` builds it; the
    switches as the command line hands them over (text)."""
    overrides = {**TINY, "dataset_dir": str(data), "train#slices_per_volume": 1, "num_workers": 0, **switches}
    workflow = ConfigWorkflow(
        config_file=config_files("train"), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type="train", bundle_root=str(root), **overrides,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def test_the_bundle_trains_with_every_switch_given_as_text(tmp_path, tiny_data):
    not_weights = tmp_path / "not_weights.pt"
    not_weights.write_text("fine-tuning from this file would fail")
    off = dict(amp="false", compile="False", finetune="false", resume="false", ckpt_path=str(not_weights))
    net = {"network_def#use_rfb": "false", "network_def#side_outputs": "0", "network_def#channels_last": "true"}
    workflow = _train(tmp_path, tiny_data, max_epochs=1, train_minutes="5", **off, **net,
                      **{"train#foreground_sampling": "false"})  # fmt: skip
    trainer = workflow.parser.get_parsed_content("train#trainer")
    # the resumable checkpoint holds the trainer's own training budget: the one that counted the epoch
    budget = workflow.parser.get_parsed_content("train#checkpoint_saver").save_dict["budget"]
    assert isinstance(budget, TrainingBudget) and budget.epochs == 1 and budget.spent > 0
    assert trainer.amp is False and trainer.compile is False and trainer.state.epoch == 1
    assert not any(type(m).__name__ == "RFB" for m in trainer.network.modules())
    assert len(trainer.network.side.convs) == 0 and trainer.network.channels_last is True
    steps = [type(t).__name__ for t in workflow.parser.get_parsed_content("train#preprocessing").transforms]
    assert "RandSpatialCropSamplesd" in steps and "RandCropByPosNegLabeld" not in steps
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".training.lock",
        "checkpoint_epoch=1.pt",
        "model.pt",
    ]

    # --resume true (lower case, as typed) continues from epoch 1's checkpoint
    workflow = _train(tmp_path, tiny_data, max_epochs=2, resume="true", train_minutes="5", **net)
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 2
    saved = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=True)["budget"]
    assert saved["epochs"] == 2 and saved["spent"] > budget.spent  # the budget went on from the first run's
    assert [int(r["epoch"]) for r in read_training_log(tmp_path / "eval" / "training_log.csv")] == [1, 2]


@pytest.mark.parametrize("sampling", ["true", "false"])
def test_training_patches_are_cut_at_the_inference_scale(tmp_path, tiny_data, sampling):
    # --train#patch_size "[16,16]" (a list, as fire hands it over): training samples are 16x16 patches of
    # the slice resized to roi_size (32x32); validation still infers whole volumes at roi_size
    workflow = _train(tmp_path, tiny_data, max_epochs=1, **{"train#patch_size": [16, 16],
                      "train#foreground_sampling": sampling})  # fmt: skip
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1
    # the engine's output, decollated: one dict per sample
    assert {tuple(s[k].shape[-2:]) for s in trainer.state.output for k in ("image", "label")} == {(16, 16)}
    assert float(read_training_log(tmp_path / "eval" / "training_log.csv")[0]["val_mean_dice"]) >= 0
