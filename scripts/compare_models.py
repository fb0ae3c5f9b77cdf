"""Evaluate trained checkpoints on a datalist with the bundle's ``evaluate`` and print one table.

    python scripts/compare_models.py --dataset_dir ../shared/data/acdc

The rows are read from the experiment folders (``experiments/<name>/rows.json``, see
:func:`read_rows`): each folder's ``override.json``, weights and training logs. Each row is the
bundle's evaluation (``configs/train.json`` + ``configs/evaluate.json`` + the folder's
``override.json``) run in a subprocess, exactly as a user runs it; the numbers come from the
``summary.json`` it writes. Each row also gives its training minutes and the minutes to first
reach 0.85 and 0.90 validation Dice (from its training logs), and the seconds per volume of the
bundle's ``inference`` with the same overrides. Rows whose checkpoint is missing are listed as not
trained, rows whose checkpoint no longer fits the network the config builds (a network changed
since, e.g. Hi-gMISnet's gate in #46) as to be retrained; both are left out of the table.
Distances (HD95, ASD) are in mm where the data carries its spacing and in voxels where it
has none (the shared ACDC copy), as each row's ``summary.json`` says; the header names the unit.
The table is printed and, with ``--markdown``, written to a file (the model card's results table).

    python scripts/compare_models.py --sizes

prints only each row's parameters and forward GFLOPs per slice (``torch.utils.flop_counter``), in a
minute and without checkpoints or data.
"""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"

EXPERIMENTS = REPO / "experiments"
# the tables, by an experiment folder's top folder: the equal-budget comparison, the ablations, and
# the rest (the shipped weights and the runs behind them)
GROUPS = {"comparison": "comparison", "ablations": "ablations"}


@dataclass(frozen=True)
class Row:
    """One table row, read from an experiment folder's ``rows.json`` (a list of rows): ``row`` its
    name; ``weights`` (default ``model.pt``) and ``logs`` (a folder or a log; default: the folder's
    ``training_log*.csv``, stages in name order) relative to the folder; ``ids`` config ids that
    evaluation and inference override (MedSegDiff's sampling rows share one training); ``order``
    its place in its table. ``overrides`` is the folder's ``override.json``, merged after the
    bundle's configs. Every row runs in float32 unless its ids say ``amp``."""

    name: str
    group: str
    folder: Path
    overrides: tuple[Path, ...]
    weights: Path
    logs: tuple[Path, ...]
    ids: dict = field(default_factory=dict, hash=False)
    order: int = 50


def _logs(where: Path) -> tuple[Path, ...]:
    return tuple(sorted(where.glob("training_log*.csv"))) if where.is_dir() else (where,)


def read_rows(root: Path = EXPERIMENTS) -> dict[str, Row]:
    """Every row of every experiment folder under ``root`` that has a ``rows.json``, by name, in
    table order (comparison, ablations, the rest; then each row's ``order``)."""
    rows = []
    for spec in sorted(root.rglob("rows.json")):
        folder = spec.parent
        group = GROUPS.get(folder.relative_to(root).parts[0], "shipped")
        override = folder / "override.json"
        for item in json.loads(spec.read_text()):
            rows.append(Row(
                name=item["row"], group=group, folder=folder,
                overrides=(override,) if override.is_file() else (),
                weights=(folder / item.get("weights", "model.pt")).resolve(),
                logs=_logs((folder / item["logs"]).resolve() if "logs" in item else folder),
                ids=dict(item.get("ids", {})), order=int(item.get("order", 50)),
            ))  # fmt: skip
    tables = ["shipped", "comparison", "ablations"]
    rows.sort(key=lambda r: (tables.index(r.group), r.order, r.name))
    return {r.name: r for r in rows}


ROWS = read_rows()


def _configs(bundle: list[str], overrides: Sequence[Path | str] = ()) -> list[str]:
    """The bundle's ``configs/<name>.json`` for each of ``bundle``, then the override files."""
    return [str(BUNDLE / "configs" / f"{n}.json") for n in bundle] + [str(o) for o in overrides]


def _network(overrides: Sequence[Path | str], ids: dict | None = None):
    """The row's network in eval mode, built from its training config (train.json + its overrides +
    its ids, as the bundle reads them), and the config's ``roi_size`` and input channels."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(["train"], overrides))
    parser["bundle_root"] = str(BUNDLE)
    for key, value in (ids or {}).items():
        parser[key] = value
    net = parser.get_parsed_content("network_def").eval()
    return net, parser.get_parsed_content("roi_size"), parser["network_def"].get("in_channels", 1)


def parameter_count(overrides: Sequence[Path | str], ids: dict | None = None) -> int:
    return sum(p.numel() for p in _network(overrides, ids)[0].parameters())


def network_size(overrides: Sequence[Path | str], ids: dict | None = None) -> tuple[int, float, list[int]]:
    """Parameters, forward GFLOPs per slice (``torch.utils.flop_counter``) and ``roi_size`` of the row's
    network as the bundle infers with it: one slice at ``roi_size`` in eval mode, so a sampling network
    counts all its steps and ensemble members, and a feedback row all its passes. ``ids``: the row's
    overrides."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net, roi_size, in_channels = _network(overrides, ids)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, in_channels, *roi_size))
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() / 1e9, roi_size


def weights_misfit(row: Row) -> str | None:
    """Why the row's weights do not load into the network its config builds (one line), or ``None``
    when they do: a network changed since they were trained has to be trained again."""
    from mgrad_net.checkpoints import check_weights
    from mgrad_net.errors import CheckpointError

    try:
        check_weights(row.weights, _network(row.overrides, row.ids)[0])
    except CheckpointError as err:
        return str(err)
    return None


def size_table(chosen: list[str]) -> str:
    """Each row's network: parameters and forward GFLOPs per slice, trained or not (no evaluation)."""
    lines = ["| model | parameters | GFLOPs per slice | roi_size |", "|---|---|---|---|"]
    for name in chosen:
        params, gflops, roi_size = network_size(ROWS[name].overrides, ROWS[name].ids)
        lines.append(f"| {name} | {params:,} | {gflops:.2f} | {'×'.join(map(str, roi_size))} |")
        print(lines[-1], file=sys.stderr, flush=True)
    note = ("\nGFLOPs per slice: one slice's forward at roi_size as the bundle infers (`torch.utils.flop_counter`; "
            "every sampling step, ensemble member and feedback pass counted).")  # fmt: skip
    return "\n".join(lines) + "\n" + note + "\n"


def _log_rows(logs: list[Path]) -> list[dict[str, str]]:
    rows = []
    for log in logs:
        if log.is_file():
            with log.open(newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def _train_seconds(row: dict[str, str]) -> float:
    # train_seconds: validation excluded (the protocol's training time); older logs have only seconds
    return float(row.get("train_seconds") or row["seconds"])


def training_minutes(logs: list[Path]) -> tuple[float | None, int | None]:
    """Training minutes and epochs over the logs (one per training stage, in order) that exist."""
    rows = _log_rows(logs)
    if not rows:
        return None, None
    return sum(map(_train_seconds, rows)) / 60, len(rows)


def minutes_to(logs: list[Path], dice: float) -> float | None:
    """Training minutes until the first epoch whose validation mean Dice reached ``dice``
    (that epoch included), over the stages' logs in order; None if none did."""
    spent = 0.0
    for row in _log_rows(logs):
        spent += _train_seconds(row)
        if row.get("val_mean_dice") and float(row["val_mean_dice"]) >= dice:
            return spent / 60
    return None


def _inference_only(overrides: Sequence[Path | str], folder: Path) -> list[Path]:
    """``overrides`` without their training-only ids (``train#...``, ``loss#...``: a ``#`` key whose
    parent inference.json does not define), as copies in ``folder`` where they had any."""
    defined = json.loads((BUNDLE / "configs" / "inference.json").read_text()).keys()

    def training_only(key: str) -> bool:
        return "#" in key and key.split("#")[0] not in defined

    kept = []
    for i, path in enumerate(map(Path, overrides)):
        config = json.loads(path.read_text())
        if any(map(training_only, config)):
            path = folder / f"override{i}.json"
            path.write_text(json.dumps({k: v for k, v in config.items() if not training_only(k)}))
        kept.append(path)
    return kept


def inference_seconds(
    overrides: Sequence[Path | str], dataset_dir: str, section: str, ckpt: Path, ids: dict | None = None
) -> float:
    """Seconds per volume of the bundle's ``inference`` (``inference.json`` + ``overrides``) on
    ``section``, as a user runs it: loading, slicing, the forward, inversion and NIfTI writing;
    the run alone, without start-up and ``initialize``. In this process, into a temporary folder.
    ``ids``: config ids overridden, as on the command line."""
    import time

    from monai.bundle import ConfigWorkflow

    with tempfile.TemporaryDirectory(prefix="compare_models_infer_") as out:
        workflow = ConfigWorkflow(
            config_file=_configs(["inference"], _inference_only(overrides, Path(out))),
            meta_file=str(BUNDLE / "configs" / "metadata.json"), logging_file=str(BUNDLE / "configs" / "logging.conf"),
            workflow_type="infer", bundle_root=str(BUNDLE), dataset_dir=dataset_dir, infer_section=section,
            output_dir=out, ckpt_path=str(ckpt), **(ids or {}),
        )  # fmt: skip
        workflow.initialize()
        start = time.perf_counter()
        workflow.run()
        seconds = time.perf_counter() - start
        cases = len(workflow.parser.get_parsed_content("dataset#data"))
        workflow.finalize()
    return seconds / cases


def evaluate(
    overrides: Sequence[Path | str],
    dataset_dir: str,
    output_dir: Path,
    section: str,
    extra: list[str] = (),
    log: Path | None = None,
    ckpt: Path | None = None,
) -> dict:
    """The bundle's ``evaluate`` with the override configs ``overrides`` (and command-line
    overrides ``extra``) on ``section``, in a subprocess; returns its ``summary.json``. ``log``:
    a file the command line is appended to. ``ckpt``: the weights (default: the configs' ``ckpt_path``)."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", json.dumps(_configs(["train", "evaluate"], overrides)),
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(BUNDLE),
        "--dataset_dir", dataset_dir,
        "--eval_section", section,
        "--output_dir", str(output_dir),
        *(["--ckpt_path", str(ckpt)] if ckpt is not None else []),
        *extra,
    ]  # fmt: skip
    if log is not None:
        with open(log, "a") as f:
            f.write(shlex.join(cmd) + "\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((output_dir / "summary.json").read_text())


ACCURACY = ("Dice RV", "Dice Myo", "Dice LV", "Dice mean", "IoU mean")


def accuracy_cells(summary: dict) -> dict[str, float]:
    """The table's accuracy columns (:data:`ACCURACY`) from an ``evaluate`` summary.json."""
    per_class = summary["per_class"]
    dice = [per_class[c]["dice"] for c in ("right ventricle", "myocardium", "left ventricle")]
    return dict(zip(ACCURACY, [*dice, summary["mean"]["dice"], summary["mean"]["iou"]]))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def row_names(rows: str) -> list[str]:
    """The row names in the comma-separated ``rows``; a name may itself hold a comma
    ("MGRAD-UNet, 3 feedback passes at inference"), so pieces join until they make a row's name."""
    names, part = [], ""
    for piece in rows.split(","):
        part = f"{part},{piece}" if part else piece
        if part.strip() in ROWS:
            names.append(part.strip())
            part = ""
    if part.strip():
        raise ValueError(f"unknown row {part.strip()!r}; the rows are: {'; '.join(ROWS)}")
    return names


def compare(
    dataset_dir: str = str(REPO.parent / "shared" / "data" / "acdc"),
    section: str = "validation",
    rows: str | None = None,
    markdown: str | None = None,
    output_dir: str | None = None,
    sizes: bool = False,
) -> str:
    """Evaluate each trained row on ``dataset_dir``'s ``section``; print (and optionally write) the table.

    Args:
        dataset_dir: the data the bundle reads (a datalist folder or a folder of image/label pairs).
        section: the datalist section to evaluate.
        rows: comma-separated row names to run (default: every row whose checkpoint exists).
        markdown: also write the table to this file.
        output_dir: keep each row's metrics.csv and summary.json under it (default: a temporary folder).
        sizes: print only each row's parameters and forward GFLOPs per slice (trained or not; no evaluation).
    """
    chosen = row_names(rows) if rows else list(ROWS)
    titles = {"shipped": "The shipped weights", "comparison": "Equal budget", "ablations": "Ablations"}
    tables = []
    for group, title in titles.items():
        part = [name for name in chosen if ROWS[name].group == group]
        if part:
            body = size_table(part) if sizes else results_table(part, dataset_dir, section, output_dir, group)
            tables.append(f"### {title}\n\n{body}")
    table = "\n".join(tables)
    print(table)
    if markdown:
        from mgrad_net.io import atomic_write_text

        atomic_write_text(markdown, table)
    return table


def results_table(
    chosen: list[str], dataset_dir: str, section: str, output_dir: str | None, group: str = "rows"
) -> str:
    """The evaluation table of the ``chosen`` rows that are trained (see :func:`compare`)."""
    import torch

    from mgrad_net.engines import native_mixed_precision

    keep = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="compare_models_"))
    lines, units = [], []
    summary: dict = {"cases": 0}  # the note's count when no chosen row is trained
    for i, name in enumerate(chosen):
        row = ROWS[name]
        overrides, logs, ckpt = row.overrides, list(row.logs), row.weights
        if not ckpt.is_file():
            print(f"{name}: not trained ({ckpt.relative_to(REPO)} missing), skipped", file=sys.stderr)
            continue
        misfit = weights_misfit(row)
        if misfit:
            print(f"{name}: to be retrained, its weights no longer fit its network, skipped: {misfit}", file=sys.stderr)
            continue
        ids = {"amp": False, **row.ids}
        if ids["amp"] and not native_mixed_precision("cuda" if torch.cuda.is_available() else "cpu"):
            print(f"{name}: skipped, this machine has no native bf16 (emulated, it runs many times slower)",
                  file=sys.stderr)  # fmt: skip
            continue
        extra = [arg for key, value in ids.items() for arg in (f"--{key}", json.dumps(value))]
        summary = evaluate(overrides, dataset_dir, keep / f"{group}{i}", section, extra, ckpt=ckpt)
        minutes, epochs = training_minutes(logs)
        mean = summary["mean"]
        units.append(summary.get("distance_unit", "voxels"))
        seconds = inference_seconds(overrides, dataset_dir, section, ckpt, ids)
        cells = [name, f"{parameter_count(overrides, ids):,}", str(epochs or "–"), _fmt(minutes, 1),
                 _fmt(minutes_to(logs, 0.85), 1), _fmt(minutes_to(logs, 0.90), 1),
                 *map(_fmt, accuracy_cells(summary).values()), _fmt(mean["hd95"], 2), _fmt(mean["asd"], 2),
                 _fmt(seconds, 2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    # the distances' unit, from each row's summary.json: mm where the data carries its spacing
    short = {"mm": "mm", "voxels": "vox"}
    unit = (
        short.get(units[0], units[0]) if len(set(units)) == 1 else "units differ: see summary.json" if units else "vox"
    )
    header = ["model", "parameters", "epochs", "training (min)", "min to 0.85", "min to 0.90", *ACCURACY,
              f"HD95 ({unit})", f"ASD ({unit})", "inference (s/volume)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines]
    note = (f"\n{summary['cases']} cases of the `{section}` section of `{Path(dataset_dir).name}`; "
            "Dice, IoU and distances over RV, Myo and LV; distances are means over the finite values. "
            "Training minutes exclude validation where the log has train_seconds (older logs: epoch wall time); "
            "min to 0.85 / 0.90: training minutes until the first epoch at that validation Dice (– never); "
            "inference: the bundle's inference run per volume, start-up excluded; float32 unless the row says "
            "bf16 (autocast, on a CPU only where it is native).")  # fmt: skip
    return "\n".join(lines) + "\n" + note + "\n"


if __name__ == "__main__":
    fire.Fire(compare)
