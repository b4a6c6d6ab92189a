"""``celery -A proj msg ...`` run for real: the ``celery`` executable of this venv in a subprocess,
with the test app's environment (as for the workers), against a real server and worker.

Dead letters come from real failures (the ``fail`` task on a worker: the built-in policy keeps
them) or are buried with :class:`DeadLetters` when a test needs particular tasks, reasons,
exception types or ages. Every test checks exit codes and the broker's state afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_helpers import Stack, wait_until
from cli_helpers import CELERY, CLI, explain

from celery_msg.core import Broker, Lease
from celery_msg.deadletters import DeadLetters

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture
def cli(stack: Stack) -> CLI:
    assert CELERY.exists(), f"no celery script at {CELERY}"
    return CLI(stack)


# -- helpers -------------------------------------------------------------------------------


def fail_on_worker(stack: Stack, *texts: str) -> list[str]:
    """Run the ``fail`` task once per text on a running worker; wait until each is dead."""
    before = stack.broker.counts(DEFAULT_QUEUE)["dead"]
    ids = []
    for text in texts:
        result = stack.task("fail").delay(text)
        with pytest.raises(ValueError):
            result.get(timeout=15)
        ids.append(result.id)
    stack.settled(DEFAULT_QUEUE, dead=before + len(texts))
    return ids


def bury(
    stack: Stack,
    *,
    task: str,
    reason: str = "failed",
    exc_type: str | None = None,
    age: float = 0.0,
    queue: str = DEFAULT_QUEUE,
    message_id: str | None = None,
) -> str:
    """Bury a dead letter directly, as if it died ``age`` seconds ago; returns its id."""
    message_id = message_id or str(uuid.uuid4())
    broker = Broker(stack.redis, prefix=stack.settings.prefix, clock=lambda: time.time() - age)
    broker.declare(queue)
    payload = json.dumps(
        {
            "body": "W1tdLCB7fSwge31d",
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"id": message_id, "task": task, "retries": 0, "lang": "py"},
            "properties": {"delivery_tag": message_id},
        }
    )
    extra: dict[str, Any] = {"task": task}
    if exc_type is not None:
        extra.update(exc_type=exc_type, exc_message="oops", traceback="Traceback ...\n")
    detail = f"{exc_type.rpartition('.')[2]}: oops" if exc_type else reason
    broker.bury(
        queue, message_id, payload, band=0, deliveries=1, reason=reason, detail=detail, **extra
    )
    return message_id


def snapshot(stack: Stack, *queues: str) -> dict[str, Any]:
    """Everything the CLI could change in ``queues``: counts, counters, dead and stored keys."""
    out: dict[str, Any] = {}
    for queue in queues:
        keys = stack.broker.keys(queue)
        out[queue] = {
            "counts": stack.broker.counts(queue),
            "stats": stack.broker.stats(queue),
            "dead": stack.redis.zrange(keys.dead, 0, -1, withscores=True),
            "ready": stack.redis.zrange(keys.ready, 0, -1, withscores=True),
            "bodies": sorted(stack.redis.hkeys(keys.body)),
            "reasons": stack.redis.hgetall(keys.reason),
        }
    return out


def dead_ids(stack: Stack, queue: str = DEFAULT_QUEUE) -> set[str]:
    return {m.id for m in DeadLetters(stack.broker).iter() if m.queue == queue}


def listed(cli: CLI, *filters: str) -> set[str]:
    return {row["id"] for row in cli.json("dlq", "list", *filters)}


# -- list ----------------------------------------------------------------------------------


def test_list_shows_failed_tasks_as_a_table_and_as_json(stack: Stack, cli: CLI):
    stack.worker()
    ids = fail_on_worker(stack, "boom", "bang")
    assert stack.task("add").delay(1, 2).get(timeout=10) == 3

    table = cli.ok("dlq", "list")
    rows = [line for line in table.splitlines() if any(i in line for i in ids)]
    assert len(rows) == 2, table
    for line in rows:
        assert "celery" in line and "fail" in line and "failed" in line
    assert "ValueError: boom" in table and "ValueError: bang" in table

    records = cli.json("dlq", "list")
    assert [r["id"] for r in records] == ids  # oldest first
    first = records[0]
    assert (first["queue"], first["task"], first["reason"], first["detail"]) == (
        DEFAULT_QUEUE,
        "fail",
        "failed",
        "ValueError: boom",
    )
    assert (first["exc_type"], first["exc_message"]) == ("builtins.ValueError", "boom")
    assert first["deliveries"] == 1 and first["retries"] == 0
    assert 0 < first["first_failure"] == first["last_failure"] <= time.time()
    assert "traceback" not in first  # only `show` has the traceback
    # Listing changes nothing.
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 2


def test_list_with_an_empty_store(stack: Stack, cli: CLI):
    stack.broker.declare(DEFAULT_QUEUE)
    assert cli.ok("dlq", "list").strip() == "no dead messages match"
    assert cli.json("dlq", "list") == []


def test_list_filters_by_queue_task_exception_reason_and_age(stack: Stack, cli: CLI):
    daily = bury(stack, task="reports.daily", exc_type="builtins.ValueError", age=2 * 3600)
    weekly = bury(stack, task="reports.weekly", reason="poison", age=600)
    charge = bury(stack, task="billing.charge", exc_type="billing.errors.CardDeclined", age=86400)
    fresh = bury(stack, task="reports.daily", exc_type="builtins.KeyError", age=5)
    other = bury(stack, task="reports.daily", reason="expired", age=60, queue=SECOND_QUEUE)
    before = snapshot(stack, DEFAULT_QUEUE, SECOND_QUEUE)

    assert listed(cli) == {daily, weekly, charge, fresh, other}
    assert listed(cli, "--queue", SECOND_QUEUE) == {other}
    assert listed(cli, "-q", DEFAULT_QUEUE) == {daily, weekly, charge, fresh}
    assert listed(cli, "--task", "reports.*") == {daily, weekly, fresh, other}
    assert listed(cli, "--task", "reports.daily") == {daily, fresh, other}
    assert listed(cli, "--task", "reports") == set()
    assert listed(cli, "--exc-type", "ValueError") == {daily}
    assert listed(cli, "--exc-type", "builtins.ValueError") == {daily}
    assert listed(cli, "--exc-type", "CardDeclined") == {charge}
    assert listed(cli, "-e", "billing.errors.CardDeclined") == {charge}
    assert listed(cli, "--exc-type", "errors.CardDeclined") == set()
    assert listed(cli, "--reason", "poison") == {weekly}
    assert listed(cli, "--reason", "failed") == {daily, charge, fresh}
    assert listed(cli, "--older-than", "1h") == {daily, charge}
    assert listed(cli, "--older-than", "30m", "--newer-than", "3h") == {daily}
    assert listed(cli, "--newer-than", "15m") == {weekly, fresh, other}
    assert listed(cli, "--newer-than", "300") == {fresh, other}  # seconds; margin for a slow run
    assert listed(cli, "--older-than", "2d") == set()
    assert listed(cli, "--task", "reports.*", "--newer-than", "15m", "-q", DEFAULT_QUEUE) == {
        weekly,
        fresh,
    }
    # oldest first, and --limit cuts
    assert [r["id"] for r in cli.json("dlq", "list", "-q", DEFAULT_QUEUE, "--limit", "2")] == [
        charge,
        daily,
    ]

    bad = cli("dlq", "list", "--older-than", "soon")
    assert bad.returncode == 2, explain(bad)
    assert "not a duration" in bad.stderr
    assert snapshot(stack, DEFAULT_QUEUE, SECOND_QUEUE) == before


# -- show ----------------------------------------------------------------------------------


def test_show_json_has_the_record_traceback_headers_and_message(stack: Stack, cli: CLI):
    stack.worker()
    [task_id] = fail_on_worker(stack, "boom")

    shown = cli.json("dlq", "show", task_id)

    assert (shown["id"], shown["queue"], shown["task"], shown["reason"]) == (
        task_id,
        DEFAULT_QUEUE,
        "fail",
        "failed",
    )
    assert shown["exc_type"] == "builtins.ValueError" and shown["exc_message"] == "boom"
    assert "raise ValueError(text)" in shown["traceback"]
    assert shown["traceback"].rstrip().endswith("ValueError: boom")
    assert shown["headers"]["id"] == task_id and shown["headers"]["task"] == "fail"
    assert shown["headers"]["argsrepr"] == "('boom',)"
    assert shown["message"]["headers"]["id"] == task_id

    text = cli.ok("dlq", "show", task_id)
    assert task_id in text and "builtins.ValueError" in text
    assert "traceback" in text and "raise ValueError(text)" in text
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 1


def test_show_of_an_unknown_or_no_longer_dead_id_fails(stack: Stack, cli: CLI):
    stack.broker.declare(DEFAULT_QUEUE)
    ready = stack.task("add").delay(1, 1).id  # no worker: it stays READY

    for missing in ("no-such-id", ready):
        done = cli("dlq", "show", missing)
        assert done.returncode == 1, explain(done)
        assert "no dead message" in done.stderr
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 1,
        "reserved": 0,
        "scheduled": 0,
        "dead": 0,
    }


# -- replay --------------------------------------------------------------------------------


def test_a_replayed_failing_task_runs_again_on_the_worker_and_is_dead_again(stack: Stack, cli: CLI):
    stack.worker()
    [task_id, other] = fail_on_worker(stack, "boom", "untouched")
    [before] = [r for r in cli.json("dlq", "list") if r["id"] == task_id]

    out = cli.ok("dlq", "replay", task_id, "--yes")

    assert out.strip() == "replayed 1 of 1 dead messages"

    def died_again() -> bool:
        stats = stack.broker.stats(DEFAULT_QUEUE)
        return stats.get("replayed") == 1 and stats.get("dead") == 3

    wait_until(died_again, 15, "the replayed task to fail again")
    stack.settled(DEFAULT_QUEUE, dead=2)
    [after] = [r for r in cli.json("dlq", "list") if r["id"] == task_id]
    assert after["last_failure"] > before["last_failure"]
    assert after["reason"] == "failed" and after["detail"] == "ValueError: boom"
    assert after["deliveries"] == 1  # the count restarted with the replay
    assert dead_ids(stack) == {task_id, other}
    assert stack.task("fail").AsyncResult(task_id).state == "FAILURE"


def test_replaying_the_same_id_twice_enqueues_it_once(stack: Stack, cli: CLI):
    worker = stack.worker()
    [task_id] = fail_on_worker(stack, "boom")
    worker.kill()  # nothing consumes: the replayed message stays READY

    assert cli.json("dlq", "replay", task_id, "--yes") == {
        "matched": 1,
        "replay": 1,
        "skipped": 0,
    }
    again = cli("dlq", "replay", task_id, "--yes")

    assert again.returncode == 1, explain(again)
    assert "no dead message" in again.stderr
    counts = stack.settled(DEFAULT_QUEUE, ready=1)
    assert counts["dead"] == 0
    assert stack.broker.stats(DEFAULT_QUEUE)["replayed"] == 1
    [info] = stack.broker.lookup(task_id)
    assert (str(info.state), info.deliveries) == ("READY", 0)

    # ... and a new worker runs it (it fails again: dead again).
    stack.worker()
    stack.settled(DEFAULT_QUEUE, dead=1, timeout=15)
    assert dead_ids(stack) == {task_id}


def test_the_same_id_twice_in_one_replay_is_replayed_once_and_reported_skipped(
    stack: Stack, cli: CLI
):
    task_id = bury(stack, task="reports.daily", exc_type="builtins.ValueError")

    assert cli.json("dlq", "replay", task_id, task_id, "--yes") == {
        "matched": 2,
        "replay": 1,
        "skipped": 1,
    }
    stack.settled(DEFAULT_QUEUE, ready=1)
    assert stack.broker.stats(DEFAULT_QUEUE)["replayed"] == 1


def test_replay_by_filter_replays_only_the_matching_ones_and_they_run_again(stack: Stack, cli: CLI):
    stack.worker()
    failed = fail_on_worker(stack, "one", "two")
    poison = bury(stack, task="fail", reason="poison")
    old = bury(stack, task="fail", exc_type="builtins.ValueError", age=7200)

    out = cli.json("dlq", "replay", "--exc-type", "ValueError", "--newer-than", "1h", "--yes")

    assert out == {"matched": 2, "replay": 2, "skipped": 0}

    def both_died_again() -> bool:
        stats = stack.broker.stats(DEFAULT_QUEUE)
        return stats.get("replayed") == 2 and stats.get("dead") == 6  # 4 buried + 2 again

    wait_until(both_died_again, 15, "the two replayed tasks to fail again")
    stack.settled(DEFAULT_QUEUE, dead=4)
    assert dead_ids(stack) == {*failed, poison, old}
    records = {r["id"]: r for r in cli.json("dlq", "list")}
    assert records[poison]["reason"] == "poison"
    assert records[old]["last_failure"] < time.time() - 3600


def test_replay_by_ids_applies_the_filters_too(stack: Stack, cli: CLI):
    poison = bury(stack, task="t", reason="poison")
    before = snapshot(stack, DEFAULT_QUEUE)

    out = cli.ok("dlq", "replay", poison, "--reason", "failed", "--yes")

    assert out.strip() == "0 dead messages match; nothing done"
    assert snapshot(stack, DEFAULT_QUEUE) == before


def test_dry_run_counts_but_touches_nothing(stack: Stack, cli: CLI):
    stack.worker()
    fail_on_worker(stack, "a", "b")
    bury(stack, task="x", reason="poison", queue=SECOND_QUEUE)
    before = snapshot(stack, DEFAULT_QUEUE, SECOND_QUEUE)

    assert cli.json("dlq", "replay", "--all", "--dry-run") == {
        "matched": 3,
        "replay": 0,
        "dry_run": True,
    }
    assert cli.json("dlq", "purge", "--all", "--dry-run", "--yes") == {
        "matched": 3,
        "purge": 0,
        "dry_run": True,
    }
    assert cli.json("dlq", "purge", "--reason", "poison", "--dry-run") == {
        "matched": 1,
        "purge": 0,
        "dry_run": True,
    }
    text = cli.ok("dlq", "replay", "--task", "fail", "--dry-run", "--yes")
    assert text.strip() == "2 dead messages match; nothing done"

    # The CLI has exited: what it wrote is in Redis now (a replay moves a message out of the
    # dead store and counts it as replayed, whether or not the worker ran it since).
    assert snapshot(stack, DEFAULT_QUEUE, SECOND_QUEUE) == before


@pytest.mark.parametrize("verb", ["replay", "purge"])
def test_without_yes_on_a_closed_stdin_nothing_is_done(stack: Stack, cli: CLI, verb: str):
    bury(stack, task="t")
    before = snapshot(stack, DEFAULT_QUEUE)

    done = cli("dlq", verb, "--all")

    assert done.returncode == 1, explain(done)
    assert f"{verb} 1 dead messages?" in done.stderr and "Aborted" in done.stderr
    assert snapshot(stack, DEFAULT_QUEUE) == before

    refused = cli("dlq", verb, "--all", input="n\n")
    assert refused.returncode == 1, explain(refused)
    assert snapshot(stack, DEFAULT_QUEUE) == before

    confirmed = cli("dlq", verb, "--all", input="y\n")
    assert confirmed.returncode == 0, explain(confirmed)
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 0


@pytest.mark.parametrize("verb", ["replay", "purge"])
@pytest.mark.parametrize("extra", [[], ["--yes"], ["--queue", DEFAULT_QUEUE, "--yes"]])
def test_replay_or_purge_without_ids_filters_or_all_is_a_usage_error(
    stack: Stack, cli: CLI, verb: str, extra: list[str]
):
    bury(stack, task="t")
    before = snapshot(stack, DEFAULT_QUEUE)

    done = cli("dlq", verb, *extra)

    assert done.returncode == 2, explain(done)
    assert "name message ids, give a filter, or pass --all" in done.stderr
    assert done.stdout == ""
    assert snapshot(stack, DEFAULT_QUEUE) == before


# -- purge ---------------------------------------------------------------------------------


def test_purge_all_yes_empties_every_dead_letter_store_and_nothing_else(stack: Stack, cli: CLI):
    stack.worker()
    failed = fail_on_worker(stack, "a", "b")
    stack.workers[0].kill()
    buried = bury(stack, task="x", reason="poison", queue=SECOND_QUEUE)
    waiting = stack.task("add").delay(2, 2).id  # READY, must survive
    before = snapshot(stack, DEFAULT_QUEUE)

    out = cli.ok("dlq", "purge", "--all", "--yes")

    assert out.strip() == "purged 3 of 3 dead messages"
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 1,
        "reserved": 0,
        "scheduled": 0,
        "dead": 0,
    }
    assert stack.broker.counts(SECOND_QUEUE)["dead"] == 0
    for gone in (*failed, buried):
        assert stack.broker.lookup(gone) == []
    [info] = stack.broker.lookup(waiting)
    assert str(info.state) == "READY"
    after = snapshot(stack, DEFAULT_QUEUE)[DEFAULT_QUEUE]
    assert after["ready"] == before[DEFAULT_QUEUE]["ready"]
    assert after["bodies"] == [waiting.encode()]
    assert after["reasons"] == {}
    assert cli.json("dlq", "list") == []
    assert cli.ok("dlq", "purge", "--all", "--yes").strip() == "0 dead messages match; nothing done"


def test_purge_by_filter_removes_only_the_matching_ones(stack: Stack, cli: CLI):
    keep = bury(stack, task="reports.daily", exc_type="builtins.ValueError")
    drop = bury(stack, task="reports.daily", reason="poison")
    old = bury(stack, task="billing.charge", reason="poison", age=3 * 86400)

    assert cli.json("dlq", "purge", "--reason", "poison", "--older-than", "1d", "--yes") == {
        "matched": 1,
        "purge": 1,
        "skipped": 0,
    }
    assert dead_ids(stack) == {keep, drop}
    assert cli.ok("dlq", "purge", drop, "--yes").strip() == "purged 1 of 1 dead messages"
    assert dead_ids(stack) == {keep}
    assert stack.broker.lookup(old) == [] and stack.broker.lookup(drop) == []


# -- inspect -------------------------------------------------------------------------------


def test_inspect_a_ready_message(stack: Stack, cli: CLI):
    task_id = stack.task("add").delay(4, 5).id  # no worker running

    found = cli.json("inspect", task_id)

    assert found["id"] == task_id and found["result"] == "PENDING"
    [instance] = found["instances"]
    assert (instance["queue"], instance["state"], instance["deliveries"]) == (
        DEFAULT_QUEUE,
        "READY",
        0,
    )
    assert instance["key"] == task_id
    assert instance["owner"] is None and instance["lease_deadline"] is None
    assert instance["due"] is None and instance["dead_reason"] is None
    assert "waiting in its queue" in instance["history"]
    text = cli.ok("inspect", task_id)
    assert "READY" in text and "waiting in its queue" in text
    # Inspecting changes nothing.
    stack.settled(DEFAULT_QUEUE, ready=1)


def test_inspect_a_scheduled_message(stack: Stack, cli: CLI):
    sent = time.time()
    task_id = stack.task("add").apply_async((1, 1), countdown=60).id  # no worker running

    found = cli.json("inspect", task_id)

    [instance] = found["instances"]
    assert (instance["queue"], instance["state"]) == (DEFAULT_QUEUE, "SCHEDULED")
    assert sent + 59 <= instance["due"] <= time.time() + 61
    assert any(line.startswith("waits in Redis until") for line in instance["history"])
    assert any(line.startswith("eta ") for line in instance["history"])
    assert found["result"] == "PENDING"
    stack.settled(DEFAULT_QUEUE, scheduled=1)


def test_inspect_a_dead_message(stack: Stack, cli: CLI):
    stack.worker()
    [task_id] = fail_on_worker(stack, "boom")

    found = cli.json("inspect", task_id)

    assert found["result"] == "FAILURE"
    [instance] = found["instances"]
    assert instance["state"] == "DEAD" and instance["dead_reason"]["reason"] == "failed"
    assert instance["history"][-1].endswith("failed: ValueError: boom")


def test_inspect_an_unknown_id(stack: Stack, cli: CLI):
    stack.broker.declare(DEFAULT_QUEUE)

    assert cli.json("inspect", "no-such-id") == {
        "id": "no-such-id",
        "result": "PENDING",
        "instances": [],
    }
    text = cli.ok("inspect", "no-such-id")
    assert "no trace in the broker" in text


def test_show_and_replay_accept_a_stored_key_as_well_as_the_task_id(stack: Stack, cli: CLI):
    stack.broker.declare(DEFAULT_QUEUE)
    task_id = stack.task("add").delay(1, 2).id  # READY under its id: the copy gets id/<n>
    buried = bury(stack, task="add", reason="poison", message_id=task_id)
    [record] = cli.json("dlq", "list")
    assert (buried, record["id"]) == (task_id, task_id)
    key = record["key"]
    assert key.startswith(f"{task_id}/")

    assert cli.json("dlq", "show", key)["key"] == key
    assert cli.json("dlq", "show", task_id)["key"] == key
    assert cli.json("dlq", "replay", key, "--yes") == {"matched": 1, "replay": 1, "skipped": 0}

    stack.settled(DEFAULT_QUEUE, ready=2)
    states = sorted((i.key, str(i.state)) for i in stack.broker.lookup(task_id))
    assert states == [(task_id, "READY"), (key, "READY")]


def test_inspect_a_running_task_shows_its_lease(stack: Stack, cli: CLI):
    stack.worker()
    result = stack.task("sleep_then_record").delay(5, "long")
    stack.wait_for_events("start", 1, timeout=10)

    found = cli.json("inspect", result.id)

    [instance] = found["instances"]
    assert (instance["state"], instance["deliveries"]) == ("RESERVED", 1)
    assert instance["owner"]
    assert time.time() < instance["lease_deadline"] <= time.time() + 11
    assert any(line.startswith("leased to ") for line in instance["history"])
    assert result.get(timeout=15) == "long"
    stack.settled(DEFAULT_QUEUE)
    assert cli.json("inspect", result.id)["instances"] == []


# -- new users: ids, bodies, times, bad records (issue 13: 8-11; issue 9: 6, 7) -------------


@pytest.mark.parametrize("columns", ["80", "160"])
def test_list_never_wraps_or_cuts_an_id_so_it_can_be_pasted_into_show(
    stack: Stack, cli: CLI, columns: str
):
    ids = [
        bury(stack, task="reports.daily_summary_for_every_region", exc_type="builtins.ValueError")
        for _ in range(2)
    ]
    cli.env["COLUMNS"] = columns

    table = cli.ok("dlq", "list")

    pasted = [word for line in table.splitlines() for word in line.split() if word in ids]
    assert sorted(pasted) == sorted(ids), table
    assert "deliverie\n" not in table and "deliverie s" not in table  # nor a header
    for task_id in pasted:
        assert task_id in cli.ok("dlq", "show", task_id)


def test_show_decodes_the_body_into_args_and_kwargs(stack: Stack, cli: CLI):
    stack.broker.declare(DEFAULT_QUEUE)
    task_id = stack.app.send_task("add", (40, 2), {"note": "ünïcode"}, queue=DEFAULT_QUEUE).id
    [delivery] = stack.broker.reserve([DEFAULT_QUEUE], 1, "test-consumer")
    lease = Lease(delivery.queue, delivery.key, delivery.token)
    assert stack.broker.dead_letter(lease, "rejected", "by hand")

    text = cli.ok("dlq", "show", task_id)

    assert "args" in text and "kwargs" in text
    assert "40" in text and '"note": "ünïcode"' in text
    body = cli.json("dlq", "show", task_id)["message"]["body"]
    assert body not in text  # the base64 form only with --json


def test_times_are_seconds_in_lookup_dead_letters_and_json_alike(stack: Stack, cli: CLI):
    from celery_msg.api import dead_letters, lookup

    stack.worker()
    before = time.time()
    [task_id] = fail_on_worker(stack, "boom")
    after = time.time()

    [info] = lookup(stack.app, task_id)
    [dead] = dead_letters(stack.app)
    [listed_row] = cli.json("dlq", "list")
    assert info.dead_reason is not None
    for value in (
        info.dead_reason["first_failure"],
        info.dead_reason["last_failure"],
        info.dead_reason["time"],
        dead.first_failure,
        listed_row["first_failure"],
    ):
        assert before - 1 <= value <= after + 1


def test_inspect_shows_the_priority_as_the_readme_does_higher_first(stack: Stack, cli: CLI):
    stack.broker.declare(DEFAULT_QUEUE)
    default = stack.task("add").apply_async((1, 1), queue=DEFAULT_QUEUE).id
    urgent = stack.task("add").apply_async((1, 2), queue=DEFAULT_QUEUE, priority=200).id

    assert "priority 0 of 0-255, higher served first" in cli.ok("inspect", default)
    assert "priority 200 of 0-255, higher served first" in cli.ok("inspect", urgent)
    assert cli.json("inspect", urgent)["instances"][0]["priority"] == 200
    assert "band" not in cli.ok("inspect", urgent)


def test_a_non_json_dead_record_or_a_non_utf8_queue_name_is_counted_not_a_traceback(
    stack: Stack, cli: CLI
):
    good = bury(stack, task="reports.daily")
    bad = bury(stack, task="reports.weekly")
    keys = stack.broker.keys(DEFAULT_QUEUE)
    stack.redis.hset(keys.reason, bad, b"\xff not json {")
    from celery_msg.keys import queues_key

    stack.redis.sadd(queues_key(stack.settings.prefix), b"q\xff\xfe")

    for args in (("dlq", "list"), ("dlq", "list", "--json"), ("inspect", good)):
        done = cli(*args)
        assert done.returncode == 0, explain(done)
        assert "Traceback" not in done.stderr
        assert "unreadable record(s)" in done.stderr
    rows = cli.json("dlq", "list")
    assert {r["id"]: r["reason"] for r in rows} == {good: "failed", bad: "unreadable-record"}
    assert "2 unreadable record(s)" in cli("dlq", "list").stderr  # the record and the name
    assert cli.ok("dlq", "purge", "--reason", "unreadable-record", "--yes").startswith("purged 1")


def test_inspect_shows_a_message_whose_fields_are_corrupted_and_skips_a_broken_queue(
    stack: Stack, cli: CLI
):
    task_id = stack.task("add").delay(1, 2).id  # no worker running: READY
    keys = stack.broker.keys(DEFAULT_QUEUE)
    stack.redis.hset(keys.deliv, task_id, "many")
    stack.redis.hset(keys.order, task_id, "not a number")
    stack.redis.hset(keys.owner, task_id, b"\xff\xfe")
    # Another queue whose duplicate index is not even a hash (a bad migration).
    stack.broker.declare("broken")
    stack.redis.set(stack.broker.keys("broken").dups, "oops")

    done = cli("inspect", task_id, "--json")

    assert done.returncode == 0, explain(done)
    assert "Traceback" not in done.stderr
    [instance] = json.loads(done.stdout)["instances"]
    assert (instance["state"], instance["deliveries"], instance["priority"]) == ("READY", 0, None)
    assert stack.broker.get(task_id).owner == "\\xff\\xfe"
    assert "skipped queue 'broken'" in done.stderr


def test_a_wrong_password_is_reported_as_an_authentication_error(
    cli: CLI, server_factory: Callable[..., Server]
):
    protected = server_factory(password="right")
    cli.env["CELERY_MSG_TEST_REDIS_URL"] = protected.url.replace("://", "://:wrong@", 1)

    done = cli("dlq", "list")

    assert done.returncode == 1, explain(done)
    assert "AuthenticationFailed" in done.stderr
    assert "unreachable" not in done.stderr


def test_inspect_after_a_replay_shows_the_replay_in_the_history(stack: Stack, cli: CLI):
    worker = stack.worker()
    [task_id] = fail_on_worker(stack, "boom")
    worker.kill()  # nothing consumes: the replayed message stays READY
    cli.ok("dlq", "replay", task_id, "--yes")

    text = cli.ok("inspect", task_id)
    [instance] = cli.json("inspect", task_id)["instances"]

    assert "READY" in text
    assert "failed: ValueError: boom; replayed from the dead-letter store" in text
    assert instance["state"] == "READY" and instance["dead_reason"]["reason"] == "failed"
