"""Helpers the bundle's configs call on values a user may override from the command line."""

from __future__ import annotations

__all__ = ["flag"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", ""}


def flag(value: object, name: str = "flag") -> bool:
    """``value`` as a bool, whether the config holds it as one or the command line handed it over
    as text.

    ``python -m monai.bundle run … --amp false`` passes the string ``'false'`` (fire turns only
    ``False`` into a bool), and a non-empty string is true in Python: without this, ``--amp false``
    would switch autocast on. Text other than true/false/1/0/yes/no/on/off raises, naming ``name``.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)
