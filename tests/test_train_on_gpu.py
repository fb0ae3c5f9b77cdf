"""scripts/train_on_gpu.py, the GPU run, on this CPU with a tiny budget: the real benchmark, the
bundle's real training of each variant stopped by its time budget, and the bundle's evaluation."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys

import pytest

from mgrad_net.data import write_phantom_dataset
from tests.bundle_utils import REPO, TINY_OVERRIDES

SCRIPT = REPO / "scripts" / "train_on_gpu.py"


@pytest.mark.integration
def test_trains_for_its_budget_and_writes_weights_log_benchmark_and_evaluation(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", {"training": 3, "validation": 2}, shape=(48, 48, 3)).parent
    out = tmp_path / "run"
    overrides = shlex.join([*TINY_OVERRIDES, "--max_epochs", "40", "--train#dataloader#batch_size", "1"])
    cmd = [sys.executable, str(SCRIPT), "--minutes", "0.02", "--out_dir", str(out), "--dataset_dir", str(data),
           "--variants", "recipe,quick", "--benchmark=--parts=train --size=32 --batch=1 --passes=1",
           f"--overrides={overrides} --amp false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]

    bench = (out / "benchmark.md").read_text()
    assert "Training step, FeedbackTrainer, 1 passes" in bench and "32x32" in bench and "peak memory (GB)" in bench
    assert "train" in json.loads((out / "benchmark.json").read_text())
    # the recipe is train.json's defaults (one feedback pass, patches); quick.json's three passes on whole slices
    commands = (out / "recipe" / "commands.txt").read_text()
    assert "full_size.json" not in commands and "quick.json" not in commands
    assert "quick.json" in (out / "quick" / "commands.txt").read_text()
    variants = [line.split(" | ")[0] for line in (out / "evaluation.md").read_text().splitlines()[2:]]
    assert variants == ["| recipe", "| quick"]
    out = out / "quick"
    with (out / "training_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    # 1.2 s of training: the budget, not max_epochs (40), ended the run, after whole epochs
    assert 1 <= len(rows) < 40
    assert sum(float(r["train_seconds"]) for r in rows[:-1]) < 1.2
    assert (out / "model.pt").stat().st_size > 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["cases"] == 2
    dice = summary["mean"]["dice"]
    assert f"| {dice:.3f} |" in (out / "evaluation.md").read_text()
    commands = (out / "commands.txt").read_text()
    assert "--train_minutes 0.02" in commands and "run evaluating" in commands


def test_refuses_a_folder_that_holds_files_and_leaves_it_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_bytes(b"someone's weights")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--minutes", "1", "--out_dir", str(out), "--dataset_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"{out} exists and is not an empty folder: give a new --out_dir (nothing is overwritten)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert (out / "model.pt").read_bytes() == b"someone's weights"
