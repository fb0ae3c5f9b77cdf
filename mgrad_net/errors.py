"""The project's errors a user can act on, and how the bundle's entry shows them.

A run that stops on bad data, a missing folder, a refused overwrite, a busy or broken checkpoint
folder raises a :class:`UserError` whose message says what is wrong and names the file. Under
``python -m monai.bundle run`` such an error reaches the user wrapped in MONAI's
``RuntimeError: Failed to evaluate ConfigExpression`` (every ``$`` expression that fails is
re-raised that way), as the middle of a long chained traceback. MONAI has no switch for this, so
the configs' first ``initialize`` expression installs :func:`install_excepthook`: it prints such
an error as its message alone, last on stderr. ``MGRAD_TRACEBACK=1`` in the environment keeps the
full traceback; any other error keeps it always.

Standard library only: the light tools (the dataset converters) import the data modules that
raise these.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = [
    "UserError",
    "DataNotFoundError",
    "OverwriteRefusedError",
    "CheckpointError",
    "NoCheckpointError",
    "CkptDirInUseError",
    "NoSpaceLeftError",
    "DataFormatError",
    "NonFiniteLossError",
    "find_user_error",
    "install_excepthook",
    "TRACEBACK_ENV",
]

TRACEBACK_ENV = "MGRAD_TRACEBACK"


class UserError(Exception):
    """A problem with what the user gave (data, folders, checkpoints, options) that the message
    alone describes: the bundle's entry prints the message without a traceback."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data set's folder or datalist does not exist."""


class OverwriteRefusedError(UserError, ValueError):
    """A run would replace a file it did not write."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file cannot be used: missing, empty, truncated, of another
    architecture, or a ``ckpt_dir`` that is not a folder."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """``--resume`` into a folder that holds no checkpoint."""


class CkptDirInUseError(UserError, BlockingIOError):
    """Another live training run holds the ``ckpt_dir``'s lock."""


class DataFormatError(UserError, ValueError):
    """A datalist that is not valid JSON or lacks the section a run reads."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training met a NaN or infinite loss and stopped before it reached the weights."""


class NoSpaceLeftError(UserError, OSError):
    """The file system of an output folder is full (``ENOSPC``): the message names the folder."""


def find_user_error(error: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``error``'s chain (itself, then its ``__cause__`` or
    ``__context__``, and so on); ``None`` if there is none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ if error.__cause__ is not None else error.__context__
    return None


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _close_progress_bars() -> None:
    """Close the tqdm bars still open (Ignite's ``ProgressBar`` during training): each clears its
    line on stderr when closed, which at interpreter exit would come after the message."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def install_excepthook() -> None:
    """Make an uncaught error whose chain holds a :class:`UserError` end the process with that
    error's message alone on stderr (exit status 1, as for any uncaught error).

    Idempotent; other errors, and every error when ``MGRAD_TRACEBACK=1``, go to the hook that was
    installed before. Called first in the ``initialize`` of train.json, evaluate.json,
    inference.json and multi_gpu_train.json, so it covers everything the run evaluates after it.
    """
    if getattr(sys.excepthook, "_mgrad_net", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        error = find_user_error(value)
        if error is None or _traceback_wanted():
            previous(kind, value, tb)
            return
        _close_progress_bars()  # a live bar would redraw itself after the message, at exit
        sys.stdout.flush()  # the log goes to stdout: let it end before the message
        sys.stderr.write(f"(the run stopped; {TRACEBACK_ENV}=1 shows the traceback)\n{type(error).__name__}: {error}\n")
        sys.stderr.flush()

    hook._mgrad_net = True  # type: ignore[attr-defined]
    sys.excepthook = hook
