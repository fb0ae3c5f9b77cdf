"""The dataset converters' core: what ``scripts/convert_acdc.py`` and ``scripts/convert_synapse.py`` share.

Both converters write ``output_dir/images/``, ``output_dir/labels/`` and ``output_dir/dataset.json``
(writing each file atomically through :mod:`mgrad_net.io`), check all their input before writing
anything, and report bad input by raising :class:`ConversionError`, which their command lines turn
into a one-line message rather than a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mgrad_net.io import atomic_write_json

__all__ = [
    "ConversionError",
    "every_kth",
    "check_output_dir",
    "prepare_output_dir",
    "write_datalist",
    "run_command_line",
]


class ConversionError(Exception):
    """The input is not what the converter expects; the message names the file and the problem."""


def every_kth(names: Sequence[str], count: int) -> set[str]:
    """``count`` names spread evenly over the sorted list, the same ones on every run.

    With ``k = len(names) // count`` these are the k-th, 2k-th, ... names (counting from 1), the
    first ``count`` of them; ``count == 0`` gives the empty set.

    Raises:
        ValueError: ``count`` is negative or larger than ``len(names)``.
    """
    if not 0 <= count <= len(names):
        raise ValueError(f"count must be in 0..{len(names)}, got {count}")
    if count == 0:
        return set()
    k = len(names) // count
    return set(names[k - 1 :: k][:count])


def check_output_dir(input_dir: Path, output_dir: Path) -> None:
    """Check that a converter may write ``output_dir``, ``output_dir/images`` and ``output_dir/labels``.

    Raises:
        ConversionError: one of those folders is ``input_dir`` or lies inside it (links resolved),
            or ``output_dir`` exists and is not a folder.
    """
    inp = input_dir.resolve()
    # Every folder the converter writes into must lie outside the input tree.
    for d in (output_dir, output_dir / "images", output_dir / "labels"):
        d = d.resolve()
        if d == inp or inp in d.parents:
            raise ConversionError(f"output folder {output_dir} lies inside the input folder {input_dir}; pick another")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder")


def prepare_output_dir(output_dir: Path) -> Path:
    """Make ``output_dir/images`` and ``output_dir/labels``; remove an earlier run's datalist.

    Returns:
        The path of ``output_dir/dataset.json``, for :func:`write_datalist` once every file is written.
    """
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    (output_dir / "labels").mkdir(parents=True, exist_ok=True)
    datalist_path = output_dir / "dataset.json"
    # A datalist from an earlier run could point at files this run is replacing; drop it first so
    # an interrupted run leaves no datalist rather than a stale one.
    if datalist_path.exists():
        datalist_path.unlink()
    return datalist_path


def write_datalist(
    path: Path,
    name: str,
    description: str,
    labels: Mapping[str, str],
    splits: Mapping[str, list[dict[str, str]]],
) -> None:
    """Write a MONAI/Decathlon datalist atomically.

    Args:
        path: the ``dataset.json`` to write.
        name, description: the data set's, for the datalist's "name" and "description".
        labels: class number (as a string) -> class name.
        splits: the "training", "validation" and "test" entries. "test" is left out when it is
            empty, because MONAI's ``load_decathlon_datalist`` fails on an empty "test" list.
    """
    datalist = {
        "name": name,
        "description": description,
        "labels": dict(labels),
        "training": splits["training"],
        "validation": splits["validation"],
    }
    if splits["test"]:
        datalist["test"] = splits["test"]
    atomic_write_json(path, datalist)


def run_command_line(main: Callable[..., Any], prog: str) -> None:
    """Run ``main`` as a ``fire`` command line; a :class:`ConversionError` exits with status 1.

    Input problems are the user's to fix, not bugs: they get a one-line ``"{prog}: error: ..."``
    on stderr, not a traceback. Every other exception propagates as usual.
    """
    import fire

    try:
        fire.Fire(main)
    except ConversionError as e:
        sys.exit(f"{prog}: error: {e}")
