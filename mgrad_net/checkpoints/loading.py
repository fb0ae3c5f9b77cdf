"""Loading checkpoints, checked: the weights a run starts from are loaded and matched against the
network before anything trains; an empty, truncated, unsafe or foreign file is named in one
line, a checkpoint of other widths with the override that loads it."""

from __future__ import annotations

import json
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
        raise CheckpointError(f"{what} {path} does not exist.")
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


def mismatch(
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


def _classes_only(saved: Mapping[str, Any], network: torch.nn.Module) -> bool:
    """Whether ``saved`` is ``network``'s architecture but for its number of classes: the same
    parameter names, and (for an MGRAD-UNet) the same widths; tensors that differ differ in their
    first (output-channel) dimension only."""
    expected = _unwrap(network).state_dict()
    if set(saved) != set(expected):
        return False
    ours, theirs = _mgrad_settings(expected), _mgrad_settings(saved)
    if ours is not None and theirs is not None:
        return all(ours[k] == theirs[k] for k in ours if k != "out_channels")
    for name, tensor in expected.items():
        shape, other = tuple(tensor.shape), tuple(saved[name].shape)
        if shape != other and (len(shape) != len(other) or shape[1:] != other[1:]):
            return False
    return True


def check_weights(
    path: str | os.PathLike,
    network: torch.nn.Module,
    configs_dir: str | os.PathLike | None = None,
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
        mismatch(Path(path), saved, network, configs_dir)
        if isinstance(saved, Mapping)
        else f"{path} holds no state dict."
    )
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
