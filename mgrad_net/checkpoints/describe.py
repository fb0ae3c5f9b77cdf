"""A checkpoint that says what it holds: the record a training run saves in ``model.pt``
(:class:`~mgrad_net.checkpoints.RunRecord`: the network's class and arguments, ``roi_size``, class
names) rebuilds what inference needs, so weights of other widths or sizes run with ``--ckpt_path``
alone. Values come back as plain data from ``torch.load(weights_only=True)``; none is handed to a
config parser, and only network classes of this package or of MONAI's ``monai.networks.nets`` are
built from a record."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mgrad_net.checkpoints.loading import load_checkpoint
from mgrad_net.checkpoints.saving import read_records
from mgrad_net.errors import CheckpointError

__all__ = ["run_record", "recorded", "recorded_network", "network_from_record"]

# where a record's network class may come from: nothing else is imported on a file's word
NETWORK_MODULES = ("mgrad_net.", "monai.networks.nets.")


def run_record(path: str | os.PathLike | None) -> dict[str, Any]:
    """The :class:`~mgrad_net.checkpoints.RunRecord` saved in ``path`` (``{}`` when there is no
    such file or it has none: the weights' own check then names what is wrong with the file)."""
    if path is None or not Path(path).expanduser().is_file():
        return {}
    try:
        record = read_records(Path(path).expanduser()).get("record")
    except Exception:  # an unreadable file: check_weights names it in one line
        return {}
    return dict(record) if isinstance(record, Mapping) else {}


def recorded(path: str | os.PathLike | None, key: str, default: Any) -> Any:
    """``key`` (``roi_size``, ``class_names``) as ``path``'s record gives it, else ``default``."""
    value = run_record(path).get(key)
    return default if value is None else value


def _saved_weights(path: str | os.PathLike) -> Mapping[str, Any]:
    state = load_checkpoint(path, "weights")
    return state["model"] if "model" in state else state


def network_from_record(record: Mapping[str, Any], where: str = "the checkpoint") -> torch.nn.Module:
    """The network ``record`` names, built with the arguments it lists.

    Raises:
        CheckpointError: the record names no network, or one from outside :data:`NETWORK_MODULES`.
    """
    target, args = record.get("network"), record.get("network_args")
    if not isinstance(target, str) or "." not in target or not isinstance(args, Mapping):
        raise CheckpointError(f"{where}: its record names no network and its arguments.")
    if not target.startswith(NETWORK_MODULES):
        raise CheckpointError(
            f"{where}: its record names the network {target!r}, outside {', '.join(NETWORK_MODULES)}: "
            "not built (a checkpoint does not choose what code runs)."
        )
    module, name = target.rsplit(".", 1)
    component = getattr(importlib.import_module(module), name, None)
    if not (isinstance(component, type) and issubclass(component, torch.nn.Module)):
        raise CheckpointError(f"{where}: its record names {target!r}, which is not a network class.")
    network = component(**dict(args))
    network.init_args = dict(args)  # as parse_switches keeps them, for the next run's record
    return network


def recorded_network(
    path: str | os.PathLike | None, component: Callable[..., torch.nn.Module]
) -> Callable[..., torch.nn.Module]:
    """A ``_target_`` for ``network_def``: ``component`` built from the config's arguments, unless
    the weights at ``path`` do not fit it and their record names the network they do fit; then
    that one, with a warning naming what differs. The config keeps its classes (``out_channels``:
    fine-tuning to another class set) and every choice that leaves the weights' shapes alone
    (passes at inference, memory layout, sampling steps). ``path`` ``None``: the config's network
    (a training run from scratch). ``inference.json``:
    ``"$mgrad_net.checkpoints.recorded_network(@record_path, mgrad_net.config.parse_switches(MGRADUNet))"``.
    """

    def build(**kwargs: Any) -> torch.nn.Module:
        from mgrad_net.checkpoints.loading import _classes_only as fits  # same names, shapes but for the classes

        network = component(**kwargs)
        record = run_record(path)
        if not record.get("network"):
            return network
        saved = _saved_weights(path)  # read once: every candidate below is matched against it
        if fits(saved, network):
            return network
        args = dict(record["network_args"])
        args.update({k: kwargs[k] for k in ("out_channels",) if k in kwargs})
        rebuilt = network_from_record({**record, "network_args": args}, str(path))
        if not fits(saved, rebuilt):
            return network  # the record does not describe these weights: check_weights names the mismatch
        for key, value in kwargs.items():  # one argument at a time, where the weights still fit
            if key not in args or args[key] != value:
                trial = network_from_record({**record, "network_args": {**args, key: value}}, str(path))
                if fits(saved, trial):
                    args, rebuilt = {**args, key: value}, trial
        logging.getLogger("mgrad_net").warning(
            "%s holds a %s built with %s (its record), not this config's network: built that one",
            path, record["network"].rsplit(".", 1)[-1], _differences(args, kwargs),
        )  # fmt: skip
        return rebuilt

    return build


def _differences(recorded_args: Mapping[str, Any], config_args: Mapping[str, Any]) -> str:
    changed = {k: v for k, v in recorded_args.items() if k in config_args and config_args[k] != v}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "other arguments"
