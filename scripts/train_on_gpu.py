"""The GPU run: the recipe (train.json's defaults, as the shipped weights were trained) and the
paper's full-size network (configs/full_size.json), each for a given number of minutes on ACDC.

    python scripts/train_on_gpu.py --minutes 120 --out_dir runs/gpu --dataset_dir /path/to/acdc

Into ``--out_dir`` (a new or empty folder), one subfolder per variant (``--variants``, default
``recipe,full_size``) with items 2 and 3:

1. ``benchmark.md`` / ``benchmark.json`` (in ``--out_dir`` itself): ``scripts/benchmark.py``'s
   eval and training tables (throughput, and peak GPU memory in the memory column);
2. ``model.pt`` (the best validation epoch, with its record), ``checkpoint_epoch=N.pt``,
   ``training_log.csv``: the bundle's own ``run training`` with the variant's configs merged after
   ``configs/train.json`` and ``--train_minutes``: training stops when the budget is spent, the
   learning rate decaying with it, validation time excluded (``TrainingBudget``);
3. ``evaluation/``: the bundle's ``evaluate`` of that ``model.pt`` on the validation section
   (``metrics.csv``, ``summary.json``), and ``evaluation.md``, its row.

Every step is the command a user would type, run in a subprocess; each command line is logged in
``commands.txt``. Mixed precision is each config's choice (``amp``: float16 on CUDA, bf16 on a CPU
where it is native). On a CPU the same command runs; the test suite runs it with a tiny budget and
a small network.
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


# a variant's name -> the configs merged after train.json
VARIANTS = {"recipe": [], "full_size": ["full_size"], "quick": ["quick"]}


def main(
    minutes: float,
    out_dir: str,
    dataset_dir: str,
    variants: str | tuple = "recipe,full_size",
    benchmark: str = "--parts=eval,train --size=224 --batch=8 --rounds=1",
    overrides: str = "",
) -> None:
    """Benchmark, train for ``minutes`` and evaluate each variant; everything lands in ``out_dir``.

    Args:
        minutes: each variant's training budget, validation excluded.
        out_dir: where each variant's folder goes; new or empty.
        dataset_dir: the bundle's ``dataset_dir`` (ACDC as ``scripts/convert_acdc.py`` writes it).
        variants: comma-separated names of :data:`VARIANTS` (``quick`` for a CPU smoke run).
        benchmark: the arguments of ``scripts/benchmark.py``, run first; empty for no benchmark.
        overrides: further bundle overrides for every variant, as one string:
            ``--overrides="--max_epochs 400 --learning_rate 2e-4"`` (with ``=``, as ``--benchmark``:
            a value that starts with ``--`` would read as a flag).
    """
    root = Path(out_dir).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SystemExit(f"{root} exists and is not an empty folder: give a new --out_dir (nothing is overwritten)")
    names = variants.split(",") if isinstance(variants, str) else map(str, variants)  # fire reads "a,b" as a tuple
    chosen = [v.strip() for v in names if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        given = ", ".join(unknown) or "(none given)"
        raise SystemExit(f"unknown variant(s) {given}: --variants takes {', '.join(VARIANTS)}")
    root.mkdir(parents=True, exist_ok=True)
    if benchmark:
        bench = [sys.executable, str(REPO / "scripts" / "benchmark.py"), *shlex.split(benchmark),
                 f"--json_out={root / 'benchmark.json'}"]  # fmt: skip
        _run(bench, root, stdout=root / "benchmark.md")
    rows = []
    for variant in chosen:
        out = root / variant
        out.mkdir(parents=True)
        rows.append(_train_and_evaluate(variant, out, minutes, dataset_dir, shlex.split(overrides)))
    text = "| variant | minutes | Dice RV / Myo / LV | Dice mean | IoU mean | HD95 (vox) | ASD (vox) |\n"
    text += "|---|---|---|---|---|---|---|\n" + "".join(rows)
    (root / "evaluation.md").write_text(text)
    print(text)


def _train_and_evaluate(variant: str, out: Path, minutes: float, dataset_dir: str, overrides: list[str]) -> str:
    """One variant's training and evaluation into ``out``; its row of ``evaluation.md``."""
    configs = [BUNDLE / "configs" / f"{n}.json" for n in VARIANTS[variant]]
    train = [sys.executable, "-m", "monai.bundle", "run", "training",
             "--config_file", json.dumps([str(BUNDLE / "configs" / "train.json"), *map(str, configs)]),
             "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
             "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
             "--bundle_root", str(BUNDLE), "--dataset_dir", dataset_dir,
             "--ckpt_dir", str(out), "--output_dir", str(out), "--train_minutes", str(minutes), *overrides]  # fmt: skip
    _run(train, out)
    summary = evaluate(configs, dataset_dir, out / "evaluation", "validation", log=out / "commands.txt",
                       ckpt=out / "model.pt", extra=overrides)  # fmt: skip
    mean, per_class = summary["mean"], summary["per_class"]
    dice = " / ".join(_fmt(per_class[c]["dice"]) for c in ("right ventricle", "myocardium", "left ventricle"))
    cells = [variant, f"{minutes:g}", dice, _fmt(mean["dice"]), _fmt(mean["iou"]), _fmt(mean["hd95"], 2),
             _fmt(mean["asd"], 2)]  # fmt: skip
    row = "| " + " | ".join(cells) + " |\n"
    (out / "evaluation.md").write_text(row)
    return row


if __name__ == "__main__":
    fire.Fire(main)
