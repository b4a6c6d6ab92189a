"""Checks for configuration values, shared by transport options and policies.

Why one module: the options and the policies check the same kinds of values (integers that are
not bools, finite numbers, one of a few names), and two copies drifted into two wordings for the
same mistake. Every error here is a :class:`ConfigurationError` worded ``"<name>: must be ..."``
so that the caller can prefix where the value came from (``Exponential.base: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeGuard

from .errors import ConfigurationError


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """A finite int or float (not a bool): NaN and infinity have no place in a time."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive_number(name: str, value: object, unit: str = "") -> None:
    if not is_number(value) or not value > 0:
        raise ConfigurationError(f"{name}: must be a number > 0{unit}, got {value!r}")


def non_negative_number(name: str, value: object, unit: str = "") -> None:
    if not is_number(value) or value < 0:
        raise ConfigurationError(f"{name}: must be a number >= 0{unit}, got {value!r}")


def int_at_least(name: str, value: object, low: int, *, optional: bool = False) -> None:
    """An integer ``>= low`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if not is_int(value) or value < low:
        none = " or None" if optional else ""
        raise ConfigurationError(f"{name}: must be an integer >= {low}{none}, got {value!r}")


def int_between(name: str, value: object, low: int, high: int) -> None:
    if not is_int(value) or not low <= value <= high:
        raise ConfigurationError(f"{name}: must be an integer in {low}..{high}, got {value!r}")


def boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name}: must be True or False, got {value!r}")


def one_of(name: str, value: object, choices: Iterable[str], *, optional: bool = False) -> None:
    """One of ``choices`` (or None when ``optional``): a typo fails here, naming the field."""
    if optional and value is None:
        return
    choices = tuple(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices) + (" or None" if optional else "")
        raise ConfigurationError(f"{name}: must be one of {listed}, got {value!r}")


def instance_of(name: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    """``value`` is a ``kind``; ``what`` names it for the user (``"a Retry"``)."""
    if not isinstance(value, kind):
        raise ConfigurationError(f"{name}: must be {what}, got {value!r}")
