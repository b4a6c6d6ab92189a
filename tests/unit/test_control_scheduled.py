"""``inspect scheduled`` entries built from stored payloads: Celery's shape for a task message,
nothing (never an exception) for anything else read from Redis."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from celery_msg.control import scheduled_entry
from celery_msg.core import ScheduledMessage

DUE_MS = 1_796_000_000_000
NODE = "w1@host"


def _payload(
    *,
    body: Any = ([1, 2], {"x": 3}, {}),
    content_type: str = "application/json",
    headers: Any = None,
    properties: Any = None,
) -> bytes:
    raw = json.dumps(list(body)) if not isinstance(body, str) else body
    message = {
        "body": base64.b64encode(raw.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers
        if headers is not None
        else {
            "id": "t1",
            "task": "add",
            "eta": "2026-11-30T04:00:00.250000+00:00",
            "argsrepr": "(1, 2)",
            "kwargsrepr": "{'x': 3}",
        },
        "properties": properties
        if properties is not None
        else {
            "body_encoding": "base64",
            "priority": 7,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
        },
    }
    return json.dumps(message).encode()


def _entry(payload: bytes) -> dict[str, Any] | None:
    return scheduled_entry(ScheduledMessage("celery", "t1", DUE_MS, payload), NODE)


def test_a_task_message_becomes_an_entry_in_celerys_reply_shape():
    assert _entry(_payload()) == {
        "eta": "2026-11-30T04:00:00.250000+00:00",
        "priority": 7,
        "request": {
            "id": "t1",
            "name": "add",
            "args": [1, 2],
            "kwargs": {"x": 3},
            "type": "add",
            "hostname": NODE,
            "time_start": None,
            "acknowledged": False,
            "delivery_info": {
                "exchange": "",
                "routing_key": "celery",
                "priority": 7,
                "redelivered": False,
            },
            "worker_pid": None,
        },
    }


def test_a_body_in_another_serializer_is_shown_by_its_repr_and_never_decoded():
    entry = _entry(_payload(body="\x80\x04pickle", content_type="application/x-python-serialize"))
    assert entry is not None
    assert (entry["request"]["args"], entry["request"]["kwargs"]) == ("(1, 2)", "{'x': 3}")


def test_an_eta_header_that_is_not_a_date_gives_way_to_the_due_time():
    headers = {"id": "t1", "task": "add", "eta": "soon"}
    entry = _entry(_payload(headers=headers))
    assert entry is not None
    assert entry["eta"] == "2026-11-30T00:53:20+00:00"
    assert (entry["request"]["args"], entry["request"]["kwargs"]) == ([1, 2], {"x": 3})


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff not json",
        b"[1, 2, 3]",
        b'{"body": "x"}',
        _payload(headers={"task": "add"}),  # no id
        _payload(headers={"id": 5, "task": "add"}),
        _payload(properties=["not", "a", "dict"]),
    ],
    ids=["bytes", "a list", "no headers", "no id", "id not text", "bad properties"],
)
def test_a_payload_that_is_not_a_task_message_gives_no_entry(payload: bytes):
    assert _entry(payload) is None


def test_an_undecodable_body_keeps_the_entry_with_the_reprs():
    broken = json.loads(_payload())
    broken["body"] = "%%% not base64"
    entry = _entry(json.dumps(broken).encode())
    assert entry is not None
    assert entry["request"]["args"] == "(1, 2)"
