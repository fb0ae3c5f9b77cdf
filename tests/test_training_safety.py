"""What a training run must never lose or hide (issue #24): checkpoints written whole or not at
all, the previous one kept until the new one is complete, ``--resume`` past checkpoints that do
not load, one run per ``ckpt_dir``, nothing written before the data is validated, and the
project's own errors shown as their message: one line, last, without a traceback.

Real processes throughout: the bundle run as users run it, killed with SIGKILL mid-save; two
trainings into one folder at once; MONAI's ConfigWorkflow for the checks made before training.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from mgrad_net.checkpoints import LOCK_NAME, lock_ckpt_dir, unlock_ckpt_dir
from mgrad_net.data import write_phantom_dataset
from mgrad_net.errors import find_user_error
from mgrad_net.handlers import read_training_log
from mgrad_net.io import is_atomic_leftover
from mgrad_net.networks import MGRADUNet
from tests.bundle_utils import CONFIGS, REPO, bundle_command, config_files, run_bundle, tmpfs_refusal

# one iteration an epoch: two training volumes in a batch of three, one slice each
SMALL = ["--train#slices_per_volume", "1", "--num_workers", "0"]
# 240 MB more in the resumable checkpoint: its save takes about a second, a window for the kill
BALLAST = ["--train#checkpoint_saver#save_dict",
           "$dict(model=@network, optimizer=@optimizer, lr_scheduler=@lr_scheduler, "
           "trainer=@train#trainer, best=@validate#best_record, ballast=torch.nn.Embedding(60000, 1000))"]  # fmt: skip
TINY = {"network_def#features": [4, 8, 16, 32, 64], "network_def#decoder_channels": 8, "roi_size": [48, 48]}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Two training volumes and one validation volume (32×32×2 phantoms) with their datalist."""
    root = tmp_path_factory.mktemp("small_data")
    write_phantom_dataset(root, counts={"training": 2, "validation": 1}, shape=(32, 32, 2))
    return root


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _last_line(text: str) -> str:
    lines = text.rstrip("\n").splitlines()
    return lines[-1] if lines else ""


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _wait(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 900.0) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail, with the process's output, if the
    process ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.01)


# ---------------------------------------------------------------- item 3: atomic checkpoints, --resume


@pytest.mark.integration
def test_a_kill_mid_save_keeps_the_previous_checkpoint_and_resume_skips_those_that_do_not_load(tmp_path, small_data):
    models, log = tmp_path / "models", tmp_path / "first.log"
    data = ["--dataset_dir", str(small_data)]
    cmd = bundle_command("training", ["train"], tmp_path, *data, "--max_epochs", "3", *SMALL, *BALLAST)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        # the save of epoch 2 has begun once a file of it appears, under its own name or a temporary one
        _wait(lambda: any("checkpoint_epoch=2" in n for n in _names(models)), proc, log, "a save of epoch 2")
        proc.send_signal(signal.SIGKILL)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    first, second = models / "checkpoint_epoch=1.pt", models / "checkpoint_epoch=2.pt"
    assert first.is_file(), f"the previous checkpoint was deleted before the new one was complete: {_names(models)}"
    assert torch.load(first, weights_only=True)["trainer"]["iteration"] == 1  # one iteration an epoch
    assert not second.exists(), (
        "epoch 2's checkpoint is under its real name: written in place, or the save ended before the kill"
    )
    assert [n for n in _names(models) if is_atomic_leftover(n)], "no temporary file: the kill did not land mid-save"

    # newer checkpoints that do not load: an empty file, a truncated one (as a full disk leaves them)
    empty, truncated = models / "checkpoint_epoch=3.pt", models / "checkpoint_epoch=4.pt"
    empty.write_bytes(b"")
    with first.open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    proc = run_bundle(
        "training", ["train"], tmp_path, *data, "--max_epochs", "2", *SMALL, "--resume", "true", check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert (
        f"--resume skips checkpoint {truncated} cannot be loaded: it is truncated or not a PyTorch checkpoint" in output
    )
    assert f"--resume skips checkpoint {empty} is empty (0 bytes)" in output
    assert f"--resume continues from {first}, the newest checkpoint that loads" in output
    state = torch.load(second, weights_only=True)
    assert state["trainer"]["iteration"] == 2 and "ballast" not in state
    assert [int(r["epoch"]) for r in read_training_log(tmp_path / "eval" / "training_log.csv")] == [1, 2]
    assert not [n for n in _names(models) if is_atomic_leftover(n)], "the killed save's temporary file is still there"


_REWRITE_BEST = """
import sys, torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

# the best-weights saver exactly as train.json defines it, saving a 240 MB "network" into sys.argv[1]
parser = ConfigParser()
parser.read_config(sys.argv[2])
parser["ckpt_dir"] = sys.argv[1]
parser["validate#best_model_saver#save_dict"] = {"model": "$torch.nn.Embedding(60000, 1000)"}
parser["validate#best_model_saver#key_metric_name"] = "score"
saver = parser.get_parsed_content("validate#best_model_saver")
weights = saver.save_dict["model"].weight

def score(engine):  # a better score every epoch: model.pt is rewritten every epoch
    engine.state.metrics["score"] = float(engine.state.epoch)
    with torch.no_grad():
        weights.fill_(engine.state.epoch)
    print("saving epoch", engine.state.epoch, flush=True)

engine = Engine(lambda engine, batch: None)
engine.add_event_handler(Events.EPOCH_COMPLETED, score)
saver.attach(engine)
engine.run([0], max_epochs=2)
print("done", flush=True)
"""


def test_a_kill_while_model_pt_is_rewritten_leaves_the_previous_best_weights_whole(tmp_path):
    models, log = tmp_path / "models", tmp_path / "saver.log"
    best = models / "model.pt"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _REWRITE_BEST, str(models), str(CONFIGS / "train.json")],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        _wait(lambda: "saving epoch 2" in log.read_text(), proc, log, "epoch 2")
        inode = best.stat().st_ino if best.exists() else None  # epoch 1's file (gone already: deleted before the save)
        # the rewrite has begun once a temporary file appears, or model.pt is gone or replaced
        _wait(
            lambda: any(is_atomic_leftover(n) for n in _names(models))
                    or not best.exists() or best.stat().st_ino != inode,
            proc, log, "the rewrite of model.pt",
        )  # fmt: skip
        proc.send_signal(signal.SIGKILL)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, "the save ended before the kill"
    assert best.is_file(), "model.pt was deleted before its replacement was complete"
    kept = torch.load(best, weights_only=True)
    assert float(kept["weight"][0, 0]) == 1.0 and kept["weight"].shape == (60000, 1000)  # epoch 1's weights, whole
    assert [n for n in _names(models) if is_atomic_leftover(n)], "no temporary file: the kill did not land mid-save"


# ---------------------------------------------------------------- item 4: one run per ckpt_dir


@pytest.mark.integration
def test_a_second_training_into_a_held_ckpt_dir_is_refused_naming_the_lock_and_its_holder(tmp_path, small_data):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    models, log = first / "models", tmp_path / "first.log"
    lock = models / LOCK_NAME
    cmd = bundle_command("training", ["train"], first, "--dataset_dir", str(small_data), "--max_epochs", "500", *SMALL)
    with log.open("w") as out:
        holder = subprocess.Popen(cmd, cwd=first, stdout=out, stderr=subprocess.STDOUT)
    try:
        # the lock is taken in initialize, before the first checkpoint
        held = lambda: lock.is_file() and f"pid {holder.pid} " in lock.read_text()  # noqa: E731
        _wait(lambda: held() or (models / "checkpoint_epoch=1.pt").exists(), holder, log, "the first run's lock")
        assert held(), f"the first run trains into {models} without holding a lock: {_names(models)}"
        proc = run_bundle(
            "training", ["train"], second, "--dataset_dir", str(small_data), "--ckpt_dir", str(models),
            "--max_epochs", "1", *SMALL, check=False,
        )  # fmt: skip
        assert holder.poll() is None, "the first run did not outlive the second"
        assert proc.returncode != 0, "the second run trained into a folder another run holds"
        assert _last_line(proc.stderr) == (
            f"CkptDirInUseError: ckpt_dir {models} is in use by another run (pid {holder.pid} on "
            f"{os.uname().nodename}), which holds the lock {lock}. "
            "Wait for it to end, or give this run another --ckpt_dir."
        )
        assert "Traceback" not in proc.stderr
        assert not (second / "eval").exists() and not [n for n in _names(models) if n.startswith("model_before_")]
    finally:
        _kill(holder)
    # the killed holder's lock was released by the kernel: the next run takes it
    try:
        assert lock_ckpt_dir(models) == lock
        assert lock.read_text().startswith(f"pid {os.getpid()} ")
    finally:
        unlock_ckpt_dir(models)


# ---------------------------------------------------------------- item 6 and 10: validation first, one line


def test_data_that_fails_validation_stops_training_before_anything_is_written(tmp_path, small_data):
    listing = json.loads((small_data / "dataset.json").read_text())
    broken = tmp_path / "broken_gt.nii.gz"
    label = np.zeros((32, 32, 2), np.uint8)
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, np.diag([1.5, 1.5, 8.0, 1.0])), str(broken))
    listing["training"][1]["label"] = str(broken)
    bad_list = tmp_path / "bad.json"
    bad_list.write_text(json.dumps(listing))
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"the user's weights")
    proc = run_bundle(
        "training", ["train"], tmp_path, "--dataset_dir", str(small_data), "--datalist", str(bad_list),
        "--max_epochs", "1", *SMALL, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert _names(models) == ["model.pt"], "written before the data was validated"
    assert (models / "model.pt").read_bytes() == b"the user's weights"
    assert not (tmp_path / "eval").exists()
    assert _last_line(proc.stderr) == f"{broken}: label values [7] outside 0..3 (4 classes)"
    assert "DataValidationError: 1 problem(s) in the data set; nothing was trained or written:" in proc.stderr
    assert "Traceback" not in proc.stderr and "Failed to evaluate" not in proc.stderr


_CHAINED = """
import mgrad_net.errors as errors
errors.install_excepthook()
try:
    raise errors.CheckpointError("weights /x/model.pt is empty (0 bytes): its save was interrupted.")
except errors.CheckpointError as err:
    raise RuntimeError("Failed to evaluate ConfigExpression") from err
"""


def test_the_traceback_of_a_user_error_is_shown_only_when_asked():
    env = {k: v for k, v in os.environ.items() if k != "MGRAD_TRACEBACK"}
    quiet = subprocess.run([sys.executable, "-c", _CHAINED], capture_output=True, text=True, env=env, cwd=REPO)
    loud = subprocess.run(
        [sys.executable, "-c", _CHAINED], capture_output=True, text=True, env={**env, "MGRAD_TRACEBACK": "1"}, cwd=REPO
    )
    assert quiet.returncode == loud.returncode == 1
    assert quiet.stderr.splitlines() == [
        "(the run stopped; MGRAD_TRACEBACK=1 shows the traceback)",
        "CheckpointError: weights /x/model.pt is empty (0 bytes): its save was interrupted.",
    ]
    assert "Traceback (most recent call last)" in loud.stderr and _last_line(loud.stderr).startswith(
        "RuntimeError: Failed to evaluate"
    )


# ---------------------------------------------------------------- item 11: another architecture, in one line


def test_weights_of_other_widths_without_a_record_are_named_in_one_line(tmp_path, small_data):
    # a plain state dict (an older bundle's, or saved by hand) says nothing of its widths: the
    # message names the first tensor that differs and what to give, without guessing from names
    quick = MGRADUNet(out_channels=4, features=(8, 16, 32, 64, 128), decoder_channels=16)  # configs/quick.json
    weights = tmp_path / "quick_model.pt"
    torch.save(quick.state_dict(), weights)
    proc = run_bundle(
        "evaluating", ["train", "evaluate"], tmp_path, "--dataset_dir", str(small_data), "--ckpt_path", str(weights),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "size mismatch" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    last = _last_line(proc.stderr)
    assert last.startswith(f"CheckpointError: {weights} does not fit this run's MGRADUNet (")
    assert last.endswith("carries no record of the network it holds: give the config it was trained with "
                         "(its experiment's override.json).")  # fmt: skip


# ---------------------------------------------------------------- items 11, 12, 13: checked before training


def _initialize(names: list[str], root: Path, **overrides: object) -> BaseException | None:
    """Run the ``initialize`` of the bundle's ``names`` configs as ``monai.bundle run`` does;
    return what it raised (``None`` if nothing). Whatever it locked or hooked is undone."""
    hook = sys.excepthook
    workflow = ConfigWorkflow(
        config_file=config_files(*names), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type=None, bundle_root=str(root), **{**TINY, "num_workers": 0, **overrides},
    )  # fmt: skip
    try:
        workflow.initialize()
    except Exception as err:
        return err
    finally:
        sys.excepthook = hook
        if (root / "models").is_dir():
            unlock_ckpt_dir(root / "models")
    return None


def _user_message(raised: BaseException | None) -> str:
    assert raised is not None, "initialize passed: nothing was checked before training"
    error = find_user_error(raised)
    assert error is not None, f"not one of the project's errors: {raised!r} from {raised.__cause__!r}"
    return f"{type(error).__name__}: {error}"


def test_a_ckpt_dir_that_is_a_file_is_named_before_training(tmp_path, small_data):
    (tmp_path / "models").write_text("not a folder")
    raised = _initialize(["train"], tmp_path, dataset_dir=str(small_data))
    models = tmp_path / "models"
    assert _user_message(raised) == (
        f"CheckpointError: ckpt_dir {models} cannot be written: {models} is a file, not a folder. "
        "Give --ckpt_dir a folder (it is created if missing)."
    )


@pytest.mark.parametrize(
    "names, switches", [(["train"], {"finetune": "true"}), (["train", "evaluate"], {})], ids=["finetune", "evaluate"]
)
def test_an_empty_weights_file_is_named_before_training_or_evaluation(tmp_path, small_data, names, switches):
    empty = tmp_path / "model.pt"
    empty.write_bytes(b"")
    raised = _initialize(names, tmp_path, dataset_dir=str(small_data), ckpt_path=str(empty), **switches)
    assert _user_message(raised) == f"CheckpointError: weights {empty} is empty (0 bytes): its save was interrupted."


def test_finetuning_from_weights_of_other_widths_is_refused_in_one_line(tmp_path, small_data):
    weights = tmp_path / "full.pt"
    torch.save(
        {"model": MGRADUNet(out_channels=4, features=(16, 32, 64, 128, 256), decoder_channels=16).state_dict()}, weights
    )
    raised = _initialize(["train"], tmp_path, dataset_dir=str(small_data), ckpt_path=str(weights), finetune="true")
    message = _user_message(raised)
    assert "\n" not in message and "size mismatch" not in message
    assert message.startswith(f"CheckpointError: {weights} does not fit this run's MGRADUNet (")
    assert "encoder.0.conv1.conv.weight: (16, 1, 3, 3) there, (4, 1, 3, 3) here" in message
    assert message.endswith("carries no record of the network it holds: give the config it was trained with "
                            "(its experiment's override.json).")  # fmt: skip


def test_an_empty_training_list_is_named(tmp_path, small_data):
    listing = json.loads((small_data / "dataset.json").read_text())
    listing["training"] = []
    empty_list = tmp_path / "no_training.json"
    empty_list.write_text(json.dumps(listing))
    raised = _initialize(["train"], tmp_path, dataset_dir=str(small_data), datalist=str(empty_list))
    assert _user_message(raised) == (
        f"DataValidationError: no training cases in {empty_list}: its 'training' section is empty; "
        "nothing was trained or written."
    )
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- item 3 and 14: a full disk


def test_a_full_disk_leaves_no_truncated_checkpoint_and_is_named(tmp_path, small_data):
    ckpt = tmp_path / "models"
    reason = tmpfs_refusal(ckpt)
    if reason:
        pytest.skip(reason)
    listing = tmp_path / "listing.txt"
    command = bundle_command(
        "training", ["train"], tmp_path, "--dataset_dir", str(small_data), "--ckpt_dir", str(ckpt),
        "--output_dir", str(tmp_path / "eval"), "--max_epochs", "1", *SMALL,
    )  # fmt: skip
    script = (  # a 64 KiB tmpfs: the lock file fits, no checkpoint of the tiny network does
        f"mount -t tmpfs -o size=64k tmpfs '{ckpt}' && {shlex.join(command)}; "
        f"rc=$?; ls -A '{ckpt}' > '{listing}'; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=900
    )
    assert proc.returncode != 0
    assert f"no space left on {ckpt}" in _last_line(proc.stderr), proc.stderr[-3000:]
    left = listing.read_text().split()
    assert not [n for n in left if n.endswith(".pt") or ".tmp" in n], (
        f"a partial checkpoint or temporary file left: {left}"
    )
