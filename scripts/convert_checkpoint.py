"""Bring a best-weights file of an earlier bundle version to today's form: a plain state dict whose
metadata carries its records (``mgrad_net.checkpoints.with_records``).

    python scripts/convert_checkpoint.py OLD.pt NEW.pt [--best_metric 0.91 --best_metric_epoch 60]

Bundle 0.9.x between commits d55a416 and 8883813 saved ``{"model": state_dict, "record": {...}}``;
earlier versions a plain state dict without a record. Either becomes the plain state dict, with the
record it carried (if any) and, when given, the validation score it was kept for. Nothing in the
file is evaluated: it is loaded with ``weights_only``. NEW.pt must not exist (nothing is replaced).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import fire
import torch

from mgrad_net.checkpoints import load_checkpoint, with_records
from mgrad_net.io import atomic_path


class _Saved:
    """A record as it was saved, given back as ``with_records`` takes it."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def convert(old: str, new: str, best_metric: float | None = None, best_metric_epoch: int | None = None) -> str:
    if Path(new).exists():
        raise SystemExit(f"{new} exists: give a new file name (nothing is replaced).")
    state = load_checkpoint(old, "weights")
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    plain = OrderedDict(weights)
    plain._metadata = OrderedDict(getattr(weights, "_metadata", None) or {})  # type: ignore[attr-defined]
    records: dict[str, _Saved] = {}
    if isinstance(state.get("record"), dict):
        records["record"] = _Saved(state["record"])
    if best_metric is not None:
        records["best"] = _Saved({"best_metric": float(best_metric), "best_metric_epoch": int(best_metric_epoch or -1)})
    with atomic_path(new) as tmp:
        torch.save(with_records(plain, records), tmp)
    print(f"{new}: a plain state dict of {len(plain)} tensors, records: {', '.join(records) or 'none'}")
    return new


if __name__ == "__main__":
    fire.Fire(convert)
