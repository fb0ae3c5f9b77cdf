"""What a checkpoint holds and where it came from: the record saved with the best weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from mgrad_net.checkpoints.loading import _unwrap

__all__ = ["RunRecord"]


def _plain(value: Any) -> Any:
    """``value`` as plain data (numbers, text, booleans, lists, dicts), or ``None`` for anything
    else: what ``torch.load(weights_only=True)`` reads back and no parser evaluates."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() <= 16:
        return value.tolist()
    return None


def _commit() -> str:
    """The git commit of this package's checkout (``+dirty`` with uncommitted changes), or the
    installed version where it is not a checkout."""
    import subprocess

    import mgrad_net

    root = Path(mgrad_net.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = ["status", "--porcelain", "--untracked-files=no", "--", "mgrad_net", "bundle/configs"]
        dirty = subprocess.run(["git", "-C", str(root), *status], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        head = None
    if head is None or head.returncode != 0:
        return f"mgrad_net {getattr(mgrad_net, '__version__', 'unknown')} (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _describe_transform(transform: Any) -> dict[str, Any] | None:
    """A MONAI intensity transform as its class name and its scalar settings (those of the array
    transform a dictionary transform wraps)."""
    if transform is None:
        return None
    inner = next((v for v in vars(transform).values() if callable(v) and hasattr(v, "__dict__")), transform)
    scalar = (bool, int, float, str)
    settings = {k: v for k, v in vars(inner).items() if not k.startswith("_") and isinstance(v, scalar)}
    return {"transform": type(transform).__name__, **settings}


class RunRecord:
    """What a checkpoint holds and where it came from, saved in the best weights' metadata
    (``AtomicCheckpointSaver(records={"record": ...})``; :func:`~mgrad_net.checkpoints.read_records` reads it):
    the network's class and the arguments it was built with, the ``roi_size`` and class names it
    was trained at, the command and the commit that trained it. Plain data only, read back with
    ``weights_only`` and never handed to a config parser as an expression.

    Args:
        network: the run's network; its ``init_args`` (set by :func:`mgrad_net.config.parse_switches`)
            are recorded where it has them.
        roi_size: the in-plane size the network sees.
        class_names: the label names, background first.
        intensity: the intensity transform of the preprocessing (its name and settings are kept).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        roi_size: Any,
        class_names: Any,
        intensity: Any = None,
    ) -> None:
        import shlex
        import sys

        net = _unwrap(network)
        argv = list(sys.argv)
        if argv and argv[0].endswith(("monai/bundle/__main__.py", "monai\\bundle\\__main__.py")):
            argv = ["python", "-m", "monai.bundle", *argv[1:]]
        self.record: dict[str, Any] = {
            "network": f"{type(net).__module__}.{type(net).__qualname__}",
            "network_args": _plain(getattr(net, "init_args", None)),
            "roi_size": _plain(roi_size),
            "class_names": _plain(class_names),
            "intensity": _describe_transform(intensity),
            "command": shlex.join(argv),
            "commit": _commit(),
        }

    def state_dict(self) -> dict[str, Any]:
        return dict(self.record)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.record = _plain(state)
