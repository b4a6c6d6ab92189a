"""Every counter is bumped by a script (as ``STAT_<NAME>``, from the generated preamble), and
every reason word the Python side hands a script can name a counter."""

from __future__ import annotations

import pytest

from celery_msg.counters import OTHER_REASON, REASON_MAX, reason_word
from celery_msg.keys import Counter
from celery_msg.scripts import SCRIPT_NAMES, source


def _code(name: str) -> str:
    """The script as sent, without the preamble's definitions and without comments."""
    lines = source(name).splitlines()
    return "\n".join(line.split("--", 1)[0] for line in lines if not line.startswith("local STAT_"))


@pytest.mark.parametrize("counter", list(Counter))
def test_every_counter_is_bumped_by_a_script(counter: Counter):
    assert any(f"STAT_{counter.name}" in _code(name) for name in SCRIPT_NAMES)


@pytest.mark.parametrize("reason", ["failed", "poison", "missing-body", "time_limit", "x1"])
def test_reason_words_pass_through(reason: str):
    assert reason_word(reason) == reason


@pytest.mark.parametrize(
    "reason",
    ["", "Failed", "2fast", "a b", "dead:poison", "x" * (REASON_MAX + 1), "\u00e9t\u00e9"],
)
def test_anything_else_is_counted_as_other(reason: str):
    assert reason_word(reason) == OTHER_REASON
