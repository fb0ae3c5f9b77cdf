"""Reliability: a user's weights are kept, a NaN loss stops training before the step, runs repeat."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

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
from mgrad_net.handlers import StopOnNonFiniteLoss, read_training_log
from mgrad_net.io import keep_previous
from mgrad_net.losses import MGRADLoss
from tests.bundle_utils import bundle_command, run_bundle
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
        Events.ITERATION_COMPLETED,
        lambda e: params_after_first_batch.update({k: v.clone() for k, v in net.state_dict().items()}),
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
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: history.extend(float(x) for x in e.state.pass_losses)
        )
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


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended ({proc.returncode}) before {path.name} was written:\n{proc.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.integration
def test_training_killed_mid_epoch_resumes_where_its_checkpoint_left_off(tmp_path):
    # one volume per batch: 12 iterations an epoch, so the kill lands well inside epoch 2
    settings = ["--max_epochs", "3", "--train#dataloader#batch_size", "1", "--train#slices_per_volume", "2"]
    settings += ["--lr_scheduler#power", "0.9"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        root.mkdir()
    run_bundle("training", ["train"], whole, *settings)

    cmd = bundle_command("training", ["train"], killed, *settings)
    proc = subprocess.Popen(cmd, cwd=killed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(killed / "models" / "checkpoint_epoch=1.pt", proc)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "models" / "checkpoint_epoch=2.pt").exists(), "the kill came after epoch 2 ended"
    before = read_training_log(killed / "eval" / "training_log.csv")
    assert [int(r["epoch"]) for r in before] == [1]
    assert not list((killed / "models").glob(".*.tmp*")), "a half-written file survived the kill"

    run_bundle("training", ["train"], killed, *settings, "--resume", "True")
    after = read_training_log(killed / "eval" / "training_log.csv")
    reference = read_training_log(whole / "eval" / "training_log.csv")

    def column(rows, name):
        return [r[name] for r in rows]

    # the epoch count, iteration count and LR schedule continue as if never interrupted
    for name in ("epoch", "iterations", "lr"):
        assert column(after, name) == column(reference, name), name
    # the epoch before the kill is the same seeded run; the best-metric record spans the kill
    assert after[:1] == before
    assert column(after, "val_mean_dice")[:1] == column(reference, "val_mean_dice")[:1]
    dice = [float(v) for v in column(after, "val_mean_dice")]
    assert float(after[-1]["best_val_mean_dice"]) == pytest.approx(max(dice))
    state = torch.load(killed / "models" / "checkpoint_epoch=3.pt", weights_only=True)
    assert state["trainer"]["iteration"] == int(reference[-1]["iterations"])
    assert state["lr_scheduler"]["last_epoch"] == 3
    assert state["best"]["best_metric"] == pytest.approx(max(dice))


def test_resume_without_a_checkpoint_names_the_folder(tmp_path):
    proc = run_bundle("training", ["train"], tmp_path, "--max_epochs", "1", "--resume", "True", check=False)
    assert proc.returncode != 0
    assert f"nothing to resume: {tmp_path / 'models'} holds no checkpoint_epoch=<N>.pt" in proc.stderr + proc.stdout


def test_segmentations_are_written_whole_or_not_at_all(tmp_path):
    import nibabel as nib
    import numpy as np
    from monai.transforms import SaveImage

    from mgrad_net.io import AtomicNibabelWriter

    seg = MetaTensor(torch.randint(0, 4, (1, 8, 6, 3)), affine=torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0])))
    seg.meta["filename_or_obj"] = "case.nii.gz"
    save = SaveImage(output_dir=tmp_path, output_postfix="seg", separate_folder=False, writer=AtomicNibabelWriter,
                     output_dtype=np.uint8, resample=False, print_log=False)  # fmt: skip
    save(seg)
    written = tmp_path / "case_seg.nii.gz"
    img = nib.load(written)
    np.testing.assert_array_equal(np.asarray(img.dataobj), seg[0].numpy())
    np.testing.assert_allclose(img.affine, seg.affine.numpy())
    before = written.read_bytes()

    # a process killed while it replaces the file with a large one leaves the old file whole
    writer = f"""
import sys, numpy as np, torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms import SaveImage
from mgrad_net.io import AtomicNibabelWriter
big = MetaTensor(torch.randint(0, 255, (1, 512, 512, 160), dtype=torch.uint8))
big.meta["filename_or_obj"] = "case.nii.gz"
save = SaveImage(output_dir={str(tmp_path)!r}, output_postfix="seg", separate_folder=False,
                 writer=AtomicNibabelWriter, output_dtype=np.uint8, resample=False, print_log=False)
print("writing", flush=True)
save(big)
print("done", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the write ended before the kill; make the volume larger"
    assert written.read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "case_seg.nii.gz"]
    assert all(n.startswith(".case_seg.nii.gz.") for n in leftovers), leftovers  # hidden, never the real name
