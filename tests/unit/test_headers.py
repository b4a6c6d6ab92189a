"""headers.py: times read from Celery headers, which any producer writes: unreadable is None."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from celery_msg.headers import due_ms, epoch_ms, expires_ms, is_retry


def test_iso_8601_times_and_epoch_seconds_become_epoch_milliseconds():
    assert epoch_ms("2026-01-01T00:00:00+00:00") == 1_767_225_600_000
    assert epoch_ms("2026-01-01T00:00:00") == 1_767_225_600_000  # naive: UTC
    assert epoch_ms(datetime(2026, 1, 1, tzinfo=UTC)) == 1_767_225_600_000
    assert epoch_ms(1_767_225_600.5) == 1_767_225_600_500


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, 1e300, "NaN", "tomorrow", [1], {"a": 1}, True, ""],
    ids=repr,
)
def test_an_unreadable_time_is_none_not_an_error(value: object):
    assert epoch_ms(value) is None


def test_headers_that_are_not_a_mapping_have_no_due_time_and_never_expire():
    assert expires_ms(["not", "a", "dict"]) is None  # type: ignore[arg-type]
    assert due_ms({"headers": ["eta"]}) == 0
    assert due_ms({"headers": {"eta": math.nan}}) == 0


@pytest.mark.parametrize(("retries", "expected"), [(1, True), (7, True), (0, False)])
def test_a_message_with_retries_above_zero_is_a_retry(retries: int, expected: bool):
    assert is_retry({"headers": {"retries": retries}}) is expected


@pytest.mark.parametrize(
    "headers", [None, [], {}, {"retries": "3"}, {"retries": True}, {"retries": 1.5}]
)
def test_anything_else_is_not_a_retry(headers: object):
    assert is_retry({"headers": headers}) is False
