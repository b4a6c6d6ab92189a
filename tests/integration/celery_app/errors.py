"""Exceptions the test tasks raise, importable by the worker and by the tests (results)."""

from __future__ import annotations


class Transient(Exception):
    """A failure worth retrying."""


class Fatal(Exception):
    """A failure no retry can fix (policies list it in ``give_up_on``)."""
