"""Train the paper's full-size MGRAD-UNet on ACDC for a given number of minutes: the GPU run.

    python scripts/train_full_size.py --minutes 120 --out_dir runs/full_size

On a CUDA machine, into ``--out_dir`` (a new or empty folder):

1. ``benchmark.md`` / ``benchmark.json``: ``scripts/benchmark.py``'s eval and training tables at
   the full width (throughput, and peak GPU memory in the memory column);
2. ``model.pt`` (the best validation epoch), ``checkpoint_epoch=N.pt``, ``training_log.csv``:
   the bundle's own ``run training`` with ``configs/full_size.json`` merged after
   ``configs/train.json``, mixed precision on (``--amp true``), and ``--train_minutes``: training
   stops when the budget is spent, validation time excluded (``TrainingBudget``);
3. ``evaluation/``: the bundle's ``evaluate`` of that ``model.pt`` on the validation section
   (``metrics.csv``, ``summary.json``), and ``evaluation.md``, its row as in the model card.

Every step is the command a user would type, run in a subprocess; each command line is logged in
``commands.txt``. On a CPU the same command runs (without mixed precision unless it is native,
see ``mgrad_net.engines.native_mixed_precision``); the test suite runs it with a tiny budget,
the ``quick`` preset and a small benchmark. Full-size weights that beat the shipped preset's are
copied into ``bundle/models/full_size/`` by hand, with their row in the model card.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_models import _fmt, evaluate  # noqa: E402  (the model card's evaluation, one row)


def _run(cmd: list[str], out: Path, stdout: Path | None = None) -> None:
    with (out / "commands.txt").open("a") as f:
        f.write(shlex.join(cmd) + "\n")
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    if stdout is None:
        proc = subprocess.run(cmd, cwd=BUNDLE)
    else:
        with stdout.open("w") as f:
            proc = subprocess.run(cmd, cwd=BUNDLE, stdout=f)
    if proc.returncode != 0:
        raise SystemExit(
            f"{cmd[2] if cmd[1] == '-m' else Path(cmd[1]).name} failed (exit {proc.returncode}): {shlex.join(cmd)}"
        )


def main(
    minutes: float,
    out_dir: str,
    dataset_dir: str = str(REPO.parent / "shared" / "data" / "acdc"),
    configs: str = "full_size",
    amp: bool = True,
    benchmark: str = "--parts=eval,train --size=224 --batch=8 --rounds=1",
    overrides: str = "",
) -> None:
    """Benchmark, train for ``minutes``, evaluate; everything lands in ``out_dir``.

    Args:
        minutes: the training budget, validation excluded.
        out_dir: where the weights, the log, the benchmark and the evaluation go; new or empty.
        dataset_dir: the bundle's ``dataset_dir`` (ACDC as ``scripts/convert_acdc.py`` writes it).
        configs: comma-separated override configs merged after ``train.json`` (``full_size``;
            ``quick`` for a CPU smoke run).
        amp: mixed precision in training and evaluation (float16 on CUDA).
        benchmark: the arguments of ``scripts/benchmark.py``, run first; empty for no benchmark.
        overrides: further bundle overrides, as one string: ``--overrides="--max_epochs 400 --learning_rate 2e-4"``
            (with ``=``, as ``--benchmark``: a value that starts with ``--`` would read as a flag).
    """
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"{out} exists and is not an empty folder: give a new --out_dir (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in configs.split(",") if n.strip()]
    config_files = [str(BUNDLE / "configs" / f"{n}.json") for n in ["train", *names]]
    for path in config_files:
        if not Path(path).is_file():
            raise SystemExit(f"no config {path}: --configs names files in {BUNDLE / 'configs'}")

    if benchmark:
        bench = [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            *shlex.split(benchmark),
            f"--json_out={out / 'benchmark.json'}",
        ]
        _run(bench, out, stdout=out / "benchmark.md")

    train = [sys.executable, "-m", "monai.bundle", "run", "training",
             "--config_file", json.dumps(config_files),
             "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
             "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
             "--bundle_root", str(BUNDLE), "--dataset_dir", dataset_dir,
             "--ckpt_dir", str(out), "--output_dir", str(out),
             "--amp", str(amp).lower(), "--train_minutes", str(minutes), *shlex.split(overrides)]  # fmt: skip
    _run(train, out)

    summary = evaluate([*names], dataset_dir, out / "evaluation", "validation", log=out / "commands.txt",
                       ckpt=out / "model.pt", extra=["--amp", str(amp).lower(), *shlex.split(overrides)])  # fmt: skip
    mean, per_class = summary["mean"], summary["per_class"]
    dice = " / ".join(_fmt(per_class[c]["dice"]) for c in ("right ventricle", "myocardium", "left ventricle"))
    cells = [
        f"MGRAD-UNet ({', '.join(names)}), {minutes:g} min",
        dice,
        _fmt(mean["dice"]),
        _fmt(mean["iou"]),
        _fmt(mean["hd95"], 2),
        _fmt(mean["asd"], 2),
    ]
    text = (
        "| model | Dice RV / Myo / LV | Dice mean | IoU mean | HD95 (vox) | ASD (vox) |\n|---|---|---|---|---|---|\n| "
        + " | ".join(cells)
        + " |\n"
    )
    (out / "evaluation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
