"""Counter names live in one place: every counter a script bumps is a ``Counter``, and every
reason word the Python side hands a script can name a counter."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from celery_msg.counters import OTHER_REASON, REASON_MAX, Counter, reason_word
from celery_msg.scripts import SCRIPT_NAMES, source


def _counted(text: str) -> set[str]:
    return set(re.findall(r"count\(q, '([a-z_]+)'", text))


def test_every_counter_a_script_bumps_is_a_counter_of_the_enum():
    lua = resources.files("celery_msg").joinpath("lua")
    texts = [lua.joinpath(f"{name}.lua").read_text() for name in SCRIPT_NAMES]
    texts.append(lua.joinpath("_queue.lua").read_text())
    counted = set().union(*(_counted(t) for t in texts))

    assert counted
    assert counted <= {c.value for c in Counter}, counted - {c.value for c in Counter}


def test_every_counter_of_the_enum_is_bumped_by_a_script():
    counted = set().union(*(_counted(source(name)) for name in SCRIPT_NAMES))

    assert {c.value for c in Counter} <= counted


@pytest.mark.parametrize("reason", ["failed", "poison", "missing-body", "time_limit", "x1"])
def test_reason_words_pass_through(reason: str):
    assert reason_word(reason) == reason


@pytest.mark.parametrize(
    "reason", ["", "Failed", "2fast", "a b", "dead:poison", "x" * (REASON_MAX + 1), "\u00e9t\u00e9"]
)
def test_anything_else_is_counted_as_other(reason: str):
    assert reason_word(reason) == OTHER_REASON
