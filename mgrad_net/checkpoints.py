"""Training checkpoints that a kill, a full disk or a second run cannot lose.

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing every file through a
  temporary file in the same folder and a rename, and deleting the file it replaces only after
  the new one is complete. MONAI's saver passes ``atomic=False`` to Ignite's ``DiskSaver`` (for
  the file mode of ``tempfile``), and Ignite's ``Checkpoint`` removes the old file *before* it
  saves the new one: a kill or a full disk mid-save left a truncated ``checkpoint_epoch=N.pt``
  and no previous one, or no ``model.pt`` at all.
- :func:`lock_ckpt_dir`: one training run per ``ckpt_dir``, by an advisory ``flock`` that the
  kernel releases when its holder dies, so a crashed run never leaves a stale lock.
- :func:`check_weights` and :func:`resume_checkpoint`: the weights a run starts from are loaded
  and matched against the network before anything trains; an empty, truncated or foreign file is
  named in one line, a checkpoint of other widths with the override that loads it, and
  ``--resume`` steps back past checkpoints that do not load.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from mgrad_net.errors import CheckpointError, CkptDirInUseError
from mgrad_net.io import atomic_path, checkpoints_newest_first, is_atomic_leftover, latest_checkpoint, no_space_named

__all__ = [
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "LOCK_NAME",
    "lock_ckpt_dir",
    "unlock_ckpt_dir",
    "load_checkpoint",
    "check_weights",
    "resume_checkpoint",
    "RunRecord",
]

logger = logging.getLogger("mgrad_net")

LOCK_NAME = ".training.lock"
_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of the process


# ---------------------------------------------------------------- atomic saving


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler: ``torch.save`` to a hidden temporary file beside the target, flushed
    to disk, then renamed into place; the files Ignite asks to remove are removed after that.

    Ignite's ``Checkpoint`` calls :meth:`remove` for the file being replaced before it calls the
    handler for the new one, so removals wait here until the next save has completed. The file
    mode follows the umask (``tempfile``'s 0600 is why MONAI turned Ignite's atomic writes off).

    Args:
        dirname: folder of the files.
        filename: a fixed file name for every save (``model.pt``), as MONAI's key-metric saver uses.
        save_on_rank: the rank that writes in a distributed run, as Ignite's ``DiskSaver``.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0) -> None:
        self.dirname = Path(dirname).expanduser()
        self.filename = filename
        self.save_on_rank = save_on_rank
        self._pending: list[Path] = []

    def _writes(self) -> bool:
        import ignite.distributed as idist

        return idist.get_rank() == self.save_on_rank

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self.dirname / (self.filename or filename)
        if self._writes():
            # serialized in memory first: a full disk then fails in a plain write, with its errno
            # (torch.save into a file reports it as a RuntimeError without one), and is named
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with no_space_named(path), atomic_path(path, fsync=True) as tmp:
                tmp.write_bytes(buffer.getbuffer())
            for old in self._pending:
                if old != path:  # a fixed name was just replaced by the rename itself
                    old.unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        if self._writes():
            self._pending.append(self.dirname / (self.filename or filename))


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments, same file names) saving through
    :class:`AtomicDiskSaver`: a checkpoint file is complete or absent, and the one it replaces is
    deleted only after it is complete."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        # MONAI builds one Ignite Checkpoint per kind of saving, each with its own handler class
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed)


# ---------------------------------------------------------------- one run per ckpt_dir


def lock_ckpt_dir(ckpt_dir: str | os.PathLike) -> Path:
    """Take ``<ckpt_dir>/.training.lock`` for this process, or refuse: another run writes there.

    An exclusive, non-blocking ``flock`` held until the process ends; the kernel releases it when
    the process dies however it dies, so the lock of a crashed run is never stale (the file stays,
    and the next run simply takes it). The file holds the holder's pid and host, for the message.
    With the lock held, the hidden temporary files that a killed save left are removed.
    Creates ``ckpt_dir``. Returns the lock file's path.

    Raises:
        CheckpointError: ``ckpt_dir`` (or a folder above it) is a file.
        CkptDirInUseError: a live process holds the lock; the message names the lock file and the pid.
    """
    folder = Path(ckpt_dir).expanduser()
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise CheckpointError(
                f"ckpt_dir {folder} cannot hold checkpoints: {path} is a file, not a folder. "
                "Give --ckpt_dir a folder (it is created if missing)."
            )
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / LOCK_NAME).resolve()
    if lock in _held:
        return lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not written its pid yet"
        os.close(fd)
        raise CkptDirInUseError(
            f"ckpt_dir {folder} is in use by another training run ({holder}), which holds the lock {lock}. "
            "Wait for it to end, or give this run another --ckpt_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    _held[lock] = fd
    for leftover in folder.iterdir():
        if leftover.is_file() and is_atomic_leftover(leftover):
            leftover.unlink(missing_ok=True)
            logger.info("removed %s, the temporary file of a save that did not complete", leftover)
    return lock


def unlock_ckpt_dir(ckpt_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``ckpt_dir`` (it is released at exit anyway)."""
    fd = _held.pop((Path(ckpt_dir).expanduser() / LOCK_NAME).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file releases the flock


# ---------------------------------------------------------------- what a checkpoint holds


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
    """What a checkpoint holds and where it came from, saved beside its weights (``record``):
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


# ---------------------------------------------------------------- loading, checked


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``torch.load`` of ``path`` (``weights_only``, on the CPU), or an error naming the file and
    what is wrong with it.

    Raises:
        CheckpointError: the file is missing, not a file, empty, truncated, refused by
            ``weights_only``, or not a dict.
    """
    path = Path(path).expanduser()
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"{what} {path} cannot exist: {parent} is a file, not a folder.")
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): its save was interrupted.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch each raise their own kind for a bad file
        if not zipfile.is_zipfile(path):
            reason = f"it is truncated or not a PyTorch checkpoint ({path.stat().st_size} bytes, no complete archive)"
        else:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise CheckpointError(f"{what} {path} cannot be loaded: {reason}.") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a dict of state dicts.")
    return state


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel


def _mgrad_settings(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The MGRAD-UNet arguments a state dict implies (from its weight shapes), or ``None`` when
    it is not an MGRAD-UNet's."""
    try:
        first = state["encoder.0.conv1.conv.weight"]
        settings: dict[str, Any] = {
            "features": [int(state[f"encoder.{i}.conv1.conv.weight"].shape[0]) for i in range(5)],
            "decoder_channels": int(state["msd.dp54.conv.conv.weight"].shape[0]),
            "in_channels": int(first.shape[1]),
            "out_channels": int(state["msd.pyramid.head.conv.weight"].shape[0]),
        }
    except (KeyError, IndexError, AttributeError):
        return None
    settings["use_rfb"] = any(k.startswith("rfbs.") and ".branches." in k for k in state)
    settings["side_outputs"] = any(k.startswith("side.") for k in state)
    return settings


def _describe(settings: Mapping[str, Any]) -> str:
    return (
        f"features {settings['features']}, decoder_channels {settings['decoder_channels']}, "
        f"{settings['out_channels']} classes"
    )


def _override(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--network_def#{name} {str(value).lower()}"
    if isinstance(value, list):
        return f'--network_def#{name} "[{",".join(str(v) for v in value)}]"'
    return f"--network_def#{name} {value}"


def _preset(settings: Mapping[str, Any], configs_dir: str | os.PathLike | None) -> str | None:
    """The config file in ``configs_dir`` whose widths are ``settings``', if one is."""
    if configs_dir is None or not Path(configs_dir).is_dir():
        return None
    for config in sorted(Path(configs_dir).glob("*.json")):
        try:
            content = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and content.get("network_def#features") == settings["features"]:
            if (
                content.get("network_def#decoder_channels", settings["decoder_channels"])
                == settings["decoder_channels"]
            ):
                return f"configs/{config.name}"
    return None


def _mismatch(
    path: Path, saved: Mapping[str, Any], network: torch.nn.Module, configs_dir: str | os.PathLike | None
) -> str | None:
    """One line saying why ``saved`` does not load into ``network`` and what would load it;
    ``None`` when it loads (same names, same shapes)."""
    expected = _unwrap(network).state_dict()
    names_differ = set(saved) != set(expected)
    shapes_differ = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    if not names_differ and not shapes_differ:
        return None
    ours, theirs = _mgrad_settings(expected), _mgrad_settings(saved)
    if ours is not None and theirs is not None:
        changes = [
            _override(k, theirs[k])
            for k in ("features", "decoder_channels", "in_channels", "use_rfb", "side_outputs")
            if theirs[k] != ours[k]
        ]
        hints = []
        if changes:
            preset = _preset(theirs, configs_dir)
            hints.append("load it with " + " ".join(changes) + (f" (or merge {preset})" if preset else ""))
        if theirs["out_channels"] != ours["out_channels"]:
            hints.append(f"its {theirs['out_channels']} classes need class_names with {theirs['out_channels']} names")
        return (
            f"{path} holds an MGRAD-UNet with {_describe(theirs)}; this run builds {_describe(ours)}: "
            + "; ".join(hints or ["the remaining parameters differ"])
            + "."
        )
    if theirs is not None:
        return (
            f"{path} holds an MGRAD-UNet with {_describe(theirs)}, "
            f"but this run builds a {type(_unwrap(network)).__name__}: "
            "drop the override of network_def, or give the MGRAD-UNet widths."
        )
    first = next(iter(saved), "nothing")
    if ours is not None:
        return (
            f"{path} holds another network than MGRAD-UNet (its parameters are named like {first!r}): give the "
            "config it was trained with (for MONAI's BasicUNet, configs/baseline_basicunet.json)."
        )
    detail = (
        f"{shapes_differ[0]}: {tuple(saved[shapes_differ[0]].shape)} there, "
        f"{tuple(expected[shapes_differ[0]].shape)} here"
        if shapes_differ
        else f"parameter names differ, e.g. {sorted(set(saved) ^ set(expected))[0]!r}"
    )
    return (
        f"{path} does not fit this run's {type(_unwrap(network)).__name__} "
        f"({len(shapes_differ)} shape(s) differ; {detail}): "
        "give the network settings it was trained with."
    )


def check_weights(
    path: str | os.PathLike,
    network: torch.nn.Module,
    configs_dir: str | os.PathLike | None = None,
    what: str = "weights",
) -> str:
    """Check, before a run starts, that ``path`` loads into ``network`` as ``CheckpointLoader``
    with ``load_dict={"model": network}`` will load it (its ``"model"`` entry, or the whole file
    as one state dict). Returns ``path``.

    Args:
        path: the weights (``ckpt_path``).
        network: the run's network (DDP unwrapped).
        configs_dir: the bundle's configs folder: a checkpoint of other widths names the config
            file that builds them, if there is one.
        what: how the message calls the file.

    Raises:
        CheckpointError: in one line: the file is missing, empty, truncated or unreadable, or holds
            another architecture (its widths, read from the weights' shapes, and the
            ``--network_def#…`` overrides that load it).
    """
    state = load_checkpoint(path, what)
    saved = state["model"] if "model" in state else state
    problem = (
        _mismatch(Path(path), saved, network, configs_dir)
        if isinstance(saved, Mapping)
        else f"{path} holds no state dict."
    )
    if problem:
        raise CheckpointError(problem)
    return str(path)


def resume_checkpoint(
    ckpt_dir: str | os.PathLike, network: torch.nn.Module | None = None, configs_dir: str | os.PathLike | None = None
) -> str:
    """The newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` that loads, for ``--resume``.

    A newer one that is empty, truncated or unreadable (a kill or a full disk while it was written
    by an older version of this bundle, or a copy gone wrong) is skipped with a warning naming it
    and why. One that loads but holds another architecture than ``network`` stops the run, as in
    :func:`check_weights`: that is the configuration's fault, not the file's.

    Raises:
        NoCheckpointError: ``ckpt_dir`` holds no checkpoint (naming the folder).
        CheckpointError: none of them loads (each named, with why), or the newest that loads does
            not fit ``network``.
    """
    candidates = checkpoints_newest_first(ckpt_dir)
    if not candidates:
        latest_checkpoint(ckpt_dir)  # raises, naming the folder
    skipped: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if not isinstance(state.get("model"), Mapping):
                raise CheckpointError(f"checkpoint {path} holds no 'model' entry: not a resumable training state.")
        except CheckpointError as err:
            skipped.append(str(err))
            logger.warning("--resume skips %s", err)
            continue
        if network is not None:
            problem = _mismatch(path, state["model"], network, configs_dir)
            if problem:
                raise CheckpointError(problem)
        if skipped:
            logger.warning("--resume continues from %s, the newest checkpoint that loads", path)
        return str(path)
    raise CheckpointError(f"nothing to resume in {ckpt_dir}: no checkpoint loads ({' '.join(skipped)})")
