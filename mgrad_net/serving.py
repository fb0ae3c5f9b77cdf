"""Requests from a MONAI Label server, checked before any of their values reaches the bundle.

MONAI Label's stock ``BundleTrainTask`` copies request fields (``max_epochs``, ``run_id``,
``tracking_uri``, ``model_filename``, ...) into bundle config overrides, and MONAI's config
parser evaluates any text that starts with ``$`` (and follows ``@`` references, ``%`` macros and
``_target_`` components). A request is text from the network: here every field MONAI Label
passes on is given its type (integers as integers, names as base names, switches as booleans),
and nothing that the parser would read as an expression gets through, anywhere in the request.
:func:`check_train_request` and :func:`check_infer_request` return the typed request or raise
:class:`RequestError`, which the app answers with HTTP 422.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "RequestError",
    "EXPRESSION_PREFIXES",
    "refuse_expressions",
    "check_train_request",
    "check_infer_request",
]

# what MONAI's ConfigParser treats as other than a plain value: expressions, references, macros
EXPRESSION_PREFIXES = ("$", "@", "%")
# the keys that make a dict a component, or change how the parser treats it
_SPECIAL_KEYS = ("_target_", "_requires_", "_disabled_", "_mode_")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,127}")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,2})?|mps")
_RUN_IDS = ("", "run", "training")  # the ids of train.json a training may run ("": MONAI Label's default, run)
_TRACKING = ("", "none", "mlflow")


class RequestError(ValueError):
    """A request field that cannot be passed on: ``field`` names it, the message says why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"request field {field!r}: {reason}")


def refuse_expressions(value: Any, field: str) -> None:
    """Raise :class:`RequestError` if ``value``, or anything inside it, is text MONAI's config
    parser would not take as a plain value: a string starting with ``$``, ``@`` or ``%`` (after
    spaces), a dict key doing so, or a key such as ``_target_`` that makes a dict a component."""
    if isinstance(value, str):
        if value.lstrip().startswith(EXPRESSION_PREFIXES):
            raise RequestError(field, f"{value[:40]!r} would be read as a config expression or reference")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            key = str(key)
            if key.strip() in _SPECIAL_KEYS or key.lstrip().startswith(EXPRESSION_PREFIXES):
                raise RequestError(field, f"key {key[:40]!r} would be read by the config parser")
            refuse_expressions(item, f"{field}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            refuse_expressions(item, f"{field}[{i}]")


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(field, f"expected an integer, got {type(value).__name__}")
    if isinstance(value, str) and not re.fullmatch(r"\s*[0-9]{1,9}\s*", value):
        raise RequestError(field, f"expected an integer, got {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise RequestError(field, f"{number} is outside {low}..{high}")
    return number


def _boolean(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RequestError(field, f"expected true or false, got {str(value)[:40]!r}")


def _fraction(value: Any, field: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (number == -1 or 0.0 <= number < 1.0):
        raise RequestError(field, f"expected -1 (the bundle's own validation list) or 0 <= split < 1, got {value!r}")
    return number


def _one_of_list(value: Any, field: str) -> Any:
    """MONAI Label's options arrive as the chosen value, or as the option list with it first."""
    if isinstance(value, list):
        if not value:
            raise RequestError(field, "an empty list")
        return value[0]
    return value


def _name(value: Any, field: str) -> str:
    value = _one_of_list(value, field)
    if not isinstance(value, str) or (value and not _NAME.fullmatch(value)):
        raise RequestError(
            field, f"expected a plain name (letters, digits, '_', '.', '-', ' '), got {str(value)[:40]!r}"
        )
    return value


def _device(value: Any, field: str) -> str:
    value = _one_of_list(value, field)
    if not isinstance(value, str) or not _DEVICE.fullmatch(value.strip()):
        raise RequestError(field, f"expected cpu, cuda or cuda:N, got {str(value)[:40]!r}")
    return value.strip()


def _model_file(value: Any, field: str, models_dir: str | os.PathLike) -> str:
    """A file of the bundle's ``models/`` folder, named by its base name."""
    value = _one_of_list(value, field)
    if not isinstance(value, str) or not value or value in (".", "..") or Path(value).name != value or "\\" in value:
        raise RequestError(field, f"expected the base name of a file in {models_dir}, got {str(value)[:60]!r}")
    if not value.endswith(".pt") or not (Path(models_dir) / value).is_file():
        raise RequestError(field, f"{value!r} is not a .pt file in {models_dir}")
    return value


def _uri(value: Any, field: str) -> str:
    if not isinstance(value, str) or any(ord(c) < 32 for c in value) or len(value) > 512:
        raise RequestError(field, "expected a tracking URI (a path or a URL)")
    return value


def _check_known(request: Mapping[str, Any], checks: Mapping[str, Any]) -> dict[str, Any]:
    for field, value in request.items():
        if str(field).strip() in _SPECIAL_KEYS or str(field).lstrip().startswith(EXPRESSION_PREFIXES):
            raise RequestError(str(field), "a field name the config parser would read")
        refuse_expressions(value, str(field))
    typed = dict(request)
    for field, check in checks.items():
        if field in typed and typed[field] is not None:
            typed[field] = check(typed[field], field)
    return typed


def check_train_request(
    request: Mapping[str, Any], models_dir: str | os.PathLike, model_names: Iterable[str] = ()
) -> dict[str, Any]:
    """The training request with every field MONAI Label's ``BundleTrainTask`` forwards typed.

    Args:
        request: the request as the server received it (the model name and the client's params).
        models_dir: the bundle's ``models/`` folder: ``model_filename`` must name a file in it.
        model_names: the trainers the app serves; empty: any plain name.

    Raises:
        RequestError: naming the field, for a value of the wrong type or range, a path where a
            base name belongs, or text the config parser would evaluate (anywhere in the request).
    """
    names = list(model_names)

    def model(value: Any, field: str) -> str:
        value = _name(value, field)
        if names and value not in names:
            raise RequestError(field, f"no trainer {value!r} here (served: {', '.join(names)})")
        return value

    def run_id(value: Any, field: str) -> str:
        if value not in _RUN_IDS:
            raise RequestError(field, f"expected one of {', '.join(_RUN_IDS)}, got {str(value)[:40]!r}")
        return value

    def gpus(value: Any, field: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"all|[0-9]{1,2}(,[0-9]{1,2})*", value.strip()):
            raise RequestError(field, f"expected 'all' or GPU indices such as 0,1, got {str(value)[:40]!r}")
        return value.strip()

    def tracking(value: Any, field: str) -> str:
        value = _one_of_list(value, field)
        if not isinstance(value, str) or value.strip().lower() not in _TRACKING:
            raise RequestError(field, f"expected None or mlflow, got {str(value)[:40]!r}")
        return value.strip()

    checks = {
        "model": model,
        "max_epochs": lambda v, f: _integer(v, f, 1, 100_000),
        "val_split": _fraction,
        "pretrained": _boolean,
        "multi_gpu": _boolean,
        "force_multi_gpu": _boolean,
        "run_id": run_id,
        "gpus": gpus,
        "device": _device,
        "tracking": tracking,
        "tracking_uri": _uri,
        "tracking_experiment_name": _name,
        "tracking_run_name": _name,
        "model_filename": lambda v, f: _model_file(v, f, models_dir),
    }
    return _check_known(request, checks)


def check_infer_request(request: Mapping[str, Any], models_dir: str | os.PathLike) -> dict[str, Any]:
    """The inference request with the fields MONAI Label's ``BundleInferTask`` reads typed
    (``device``, ``model_filename``, the sliding-window settings); nothing in it may read as a
    config expression.

    Raises:
        RequestError: naming the field.
    """

    def roi(value: Any, field: str) -> list[int]:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 3:
            raise RequestError(field, f"expected a list of 1-3 sizes, got {str(value)[:40]!r}")
        return [_integer(v, field, 1, 4096) for v in value]

    checks = {
        "model": _name,
        "device": _device,
        "model_filename": lambda v, f: _model_file(v, f, models_dir),
        "roi_size": roi,
        "sw_batch_size": lambda v, f: _integer(v, f, 1, 1024),
        "sw_overlap": lambda v, f: _fraction(v, f) if v != -1 else _fraction("x", f),
    }
    return _check_known(request, checks)
