"""Loading checkpoints, checked: the weights a run starts from are loaded and matched against the
network before anything trains; an empty, truncated, unsafe or foreign file is named in one
line, a checkpoint of another network with what its record says it holds."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from mgrad_net.errors import CheckpointError
from mgrad_net.io import read_pretrained_state

__all__ = ["load_checkpoint", "load_pretrained", "check_weights", "mismatch"]


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
        hint = ""
        if not path.is_absolute() and not Path("configs").is_dir() and Path("bundle", "configs").is_dir():
            # run from the repository root with the bundle's default bundle_root "."
            hint = " (this is the repository root: pass --bundle_root bundle, or run from bundle/)"
        raise CheckpointError(f"{what} {path} does not exist{hint}.")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): its save was interrupted.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch each raise their own kind for a bad file
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            # torch's message goes on to advise weights_only=False: never to be taken for a file one did not make
            raise CheckpointError(
                f"{what} {path} cannot be loaded safely: it holds Python objects that loading would have to run "
                "code for (refused: tensors, numbers and text only). Re-save just its state dict, "
                "torch.save(model.state_dict(), path), where it was made."
            ) from None
        if not zipfile.is_zipfile(path):
            reason = f"it is truncated or not a PyTorch checkpoint ({path.stat().st_size} bytes, no complete archive)"
        else:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise CheckpointError(f"{what} {path} cannot be loaded: {reason}.") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a dict of state dicts.")
    return state


def load_pretrained(network: torch.nn.Module, path: str | os.PathLike | None) -> torch.nn.Module:
    """``network`` with the tensors of the local weights file ``path`` that match it by name and
    shape, through the network's own ``load_from(state_dict)`` (SwinUNETRRecA, Hi-gMISnet); the
    network itself reads no file. ``path`` empty or ``None``: ``network`` unchanged. A config can
    call it, e.g. ``--network "$mgrad_net.checkpoints.load_pretrained(@network_def, '/w.pt').to(@device)"``.

    The file holds a state dict, bare or under ``model`` / ``state_dict``; DistributedDataParallel's
    ``module.`` prefixes are dropped. Nothing is ever downloaded.

    Raises:
        CheckpointError: the file is missing or unreadable, the network has no ``load_from``, or
            none of the file's tensors fits the network.
    """
    if path is None or not str(path):
        return network
    target = _unwrap(network)
    if not callable(getattr(target, "load_from", None)):
        raise CheckpointError(f"{type(target).__name__} has no load_from(state_dict): weights {path} not loaded.")
    state = read_pretrained_state(path)
    try:
        loaded, skipped = target.load_from(state)
    except ValueError as err:
        raise CheckpointError(f"pretrained weights {path}: {err}") from err
    logging.getLogger("mgrad_net").info(
        "pretrained weights %s: %d tensors loaded, %d left as initialised", path, len(loaded), len(skipped)
    )
    return network


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel


def _record(path: Path) -> Mapping[str, Any]:
    from mgrad_net.checkpoints.saving import read_records

    try:
        record = read_records(path).get("record")
    except Exception:  # unreadable: load_checkpoint has named it already
        return {}
    return record if isinstance(record, Mapping) else {}


def _arguments(network: torch.nn.Module) -> Mapping[str, Any]:
    return getattr(_unwrap(network), "init_args", None) or {}


def mismatch(path: Path, saved: Mapping[str, Any], network: torch.nn.Module) -> str | None:
    """One line saying why ``saved`` does not load into ``network`` and what would load it;
    ``None`` when it loads (same names, same shapes). What the weights hold is read from their
    record (:class:`~mgrad_net.checkpoints.RunRecord`), never guessed from parameter names."""
    expected = _unwrap(network).state_dict()
    shapes_differ = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    if set(saved) == set(expected) and not shapes_differ:
        return None
    ours = type(_unwrap(network)).__name__
    record = _record(Path(path))
    if record.get("network"):
        theirs = str(record["network"]).rsplit(".", 1)[-1]
        args, built = record.get("network_args") or {}, _arguments(network)
        differ = ", ".join(f"{k}={v}" for k, v in args.items() if built.get(k) != v)
        return (
            f"{path} holds a {theirs} built with {differ or 'other arguments'} (its record); this run builds a "
            f"{ours}: drop the network_def overrides that differ, or give these."
        )
    detail = (
        f"{shapes_differ[0]}: {tuple(saved[shapes_differ[0]].shape)} there, "
        f"{tuple(expected[shapes_differ[0]].shape)} here"
        if shapes_differ
        else f"parameter names differ, e.g. {sorted(set(saved) ^ set(expected))[0]!r}"
    )
    return (
        f"{path} does not fit this run's {ours} ({len(shapes_differ)} shape(s) differ; {detail}) and carries no "
        "record of the network it holds: give the config it was trained with (its experiment's override.json)."
    )


def _classes_only(saved: Mapping[str, Any], network: torch.nn.Module) -> bool:
    """Whether ``saved`` is ``network``'s architecture but for its number of classes: the same
    parameter names, and tensors that differ differ in their first (output-channel) dimension only."""
    expected = _unwrap(network).state_dict()
    if set(saved) != set(expected):
        return False
    for name, tensor in expected.items():
        shape, other = tuple(tensor.shape), tuple(saved[name].shape)
        if shape != other and (len(shape) != len(other) or shape[1:] != other[1:]):
            return False
    return True


def check_weights(
    path: str | os.PathLike,
    network: torch.nn.Module,
    what: str = "weights",
    new_classes: bool = False,
) -> str:
    """Check, before a run starts, that ``path`` loads into ``network`` as ``CheckpointLoader``
    with ``load_dict={"model": network}`` will load it (its ``"model"`` entry, or the whole file
    as one state dict). Returns ``path``.

    With ``new_classes`` (fine-tuning to another class set) weights that differ from the network's
    only in the number of classes pass: the output layers whose shapes differ start fresh, and a
    warning names them (``CheckpointLoader(strict_shape=False)`` then loads the rest).

    Args:
        path: the weights (``ckpt_path``).
        network: the run's network (DDP unwrapped).
        what: how the message calls the file.

    Raises:
        CheckpointError: in one line: the file is missing, empty, truncated or unreadable, or holds
            another network (as its record names it, where it has one).
    """
    state = load_checkpoint(path, what)
    saved = state["model"] if "model" in state else state
    problem = mismatch(Path(path), saved, network) if isinstance(saved, Mapping) else f"{path} holds no state dict."
    if problem and new_classes and _classes_only(saved, network):
        skipped = [k for k, v in _unwrap(network).state_dict().items() if tuple(saved[k].shape) != tuple(v.shape)]
        logging.getLogger("mgrad_net").warning(
            "%s: fine-tuning to another class set: %d of %d tensors load; these start fresh (their shapes follow the "
            "classes): %s", path, len(saved) - len(skipped), len(saved), ", ".join(skipped))  # fmt: skip
        problem = None
    if problem:
        raise CheckpointError(problem)
    floating = ((k, v) for k, v in saved.items() if torch.is_tensor(v) and v.is_floating_point())
    broken = next((k for k, v in floating if not bool(v.isfinite().all())), None)
    if broken is not None:
        raise CheckpointError(
            f"{what} {path} hold NaN or infinite values ({broken}): the training that wrote them diverged; "
            "use an earlier checkpoint."
        )
    return str(path)
