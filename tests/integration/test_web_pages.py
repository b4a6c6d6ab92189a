"""The dashboard's pages and actions in process (Starlette's test client) on a real server:
paging large stores by rank, the queue pages, bulk actions and their counts, and records that
another program wrote badly (skipped and reported on the page, never a 500).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_helpers import Stack, stack_factory
from starlette.testclient import TestClient
from test_transport_security import _denied, readme_acl

from celery_msg.core import Broker
from celery_msg.keys import queues_key
from celery_msg.web import Dashboard, create_app, reads
from celery_msg.web.app import sampler_for
from celery_msg.web.security import CSRF_COOKIE, CSRF_FIELD

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture
def stack(server: Server, prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with stack_factory(server.url, prefix, tmp_path) as make:
        yield make()


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    with TestClient(create_app(Dashboard(stack.broker, stack.app))) as test_client:
        yield test_client


def _fill_dead(stack: Stack, queue: str, n: int, task: str = "t.bulk") -> list[str]:
    """``n`` dead letters in ``queue``, one millisecond apart (so their order is known)."""
    base = time.time() - 3600
    ids = []
    for i in range(n):
        broker = Broker(stack.redis, prefix=stack.settings.prefix, clock=lambda i=i: base + i / 1e3)
        broker.declare(queue)
        key = broker.bury(
            queue, f"{queue}-{i:05d}", b"{}", band=0, deliveries=1, reason="failed",
            detail="x", task=task,
        )  # fmt: skip
        ids.append(key)
    return ids


def _ids(html: str) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)">', html)


def _next(html: str) -> str | None:
    found = re.search(r'<a rel="next" href="\?([^"]+)"', html)
    return None if found is None else found.group(1).replace("&amp;", "&")


def _csrf(client: TestClient) -> str:
    client.get("/dead")
    token = client.cookies.get(CSRF_COOKIE)
    assert token
    return token


def test_dead_letters_page_through_every_queue_fifty_at_a_time(stack: Stack, client: TestClient):
    first = _fill_dead(stack, DEFAULT_QUEUE, 120)
    second = _fill_dead(stack, SECOND_QUEUE, 30)

    seen: list[str] = []
    query: str | None = ""
    pages = 0
    while query is not None:
        html = client.get(f"/dead?{query}").text
        rows = _ids(html)
        assert len(rows) == 50 or _next(html) is None
        assert "of 150" in html
        seen += rows
        query = _next(html)
        pages += 1

    assert pages == 3
    assert seen == first + second  # queues by name, oldest first in each, nothing twice


def test_a_filtered_page_stops_at_its_read_budget_and_the_next_goes_on(
    stack: Stack, client: TestClient, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(reads, "FILTER_SCAN_LIMIT", 40)
    _fill_dead(stack, DEFAULT_QUEUE, 100, task="t.other")
    wanted = _fill_dead(stack, SECOND_QUEUE, 3, task="t.wanted")

    found: list[str] = []
    query: str | None = "task=t.want*"
    pages = 0
    while query is not None:
        html = client.get(f"/dead?{query}").text
        found += _ids(html)
        if _next(html) is not None and not _ids(html):
            assert "more may match further on" in html
        query = _next(html)
        pages += 1

    assert found == wanted
    assert pages == 3  # 40 + 40 + (20 and the 3 of the second queue)


def test_the_queue_pages_show_leases_with_owner_and_deadline_and_schedules_with_due_time(
    stack: Stack, client: TestClient
):
    add = stack.task("add")
    ready = [add.delay(i, i).id for i in range(60)]
    later = add.apply_async((1, 1), countdown=3600)
    [delivery] = stack.broker.reserve([DEFAULT_QUEUE], 1, "w-test@host")
    assert delivery.key == ready[0]

    reserved = client.get(f"/queues/{DEFAULT_QUEUE}?state=RESERVED").text
    assert ready[0] in reserved and "w-test@host" in reserved
    deadline = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 10))
    assert deadline[:13] in reserved and "in " in reserved

    scheduled = client.get(f"/queues/{DEFAULT_QUEUE}?state=SCHEDULED").text
    due = time.strftime("%Y-%m-%d %H:", time.gmtime(time.time() + 3600))
    assert later.id in scheduled and due in scheduled

    page1 = client.get(f"/queues/{DEFAULT_QUEUE}").text
    assert "1-50 of 59" in page1
    assert all(i in page1 for i in ready[1:51]) and ready[51] not in page1
    assert "[[1, 1], {}]" in page1  # decoded arguments
    page2 = client.get(f"/queues/{DEFAULT_QUEUE}?state=READY&offset=50").text
    assert all(i in page2 for i in ready[51:]) and ready[1] not in page2


def test_replay_all_matching_asks_with_the_count_then_reports_how_many(
    stack: Stack, client: TestClient
):
    _fill_dead(stack, DEFAULT_QUEUE, 7, task="reports.daily")
    other = _fill_dead(stack, SECOND_QUEUE, 2, task="billing.charge")
    form = {"op": "replay matching", "task": "reports.*", CSRF_FIELD: _csrf(client)}

    asked = client.post("/dead/action", data=form)

    assert asked.status_code == 200 and "Replay 7 dead messages?" in asked.text
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 7
    done = client.post("/dead/action", data={**form, "confirm": "yes"})
    assert "Replayed 7 of 7 dead messages" in done.text
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 7, "reserved": 0, "scheduled": 0, "dead": 0,
    }  # fmt: skip
    assert [m.id for m in stack.broker.dead_letters(SECOND_QUEUE)] == other
    again = client.post("/dead/action", data={**form, "confirm": "yes"})
    assert "Nothing to replay" in again.text


def test_records_written_badly_are_skipped_and_reported_never_a_500(
    stack: Stack, client: TestClient
):
    good = _fill_dead(stack, DEFAULT_QUEUE, 2)
    keys = stack.broker.keys(DEFAULT_QUEUE)
    r = stack.redis
    # A dead entry whose name is not UTF-8, one whose record is not JSON, one whose
    # delivery count is not a number, a queue name that is not UTF-8, a stats key of the
    # wrong type, and a task argument that is not base64.
    r.zadd(keys.dead, {b"\xff\xfe-bad-name": time.time() * 1000})
    r.zadd(keys.dead, {"not-json": time.time() * 1000})
    r.hset(keys.body, "not-json", b"{}")
    r.hset(keys.reason, "not-json", b"\x00garbage")
    r.zadd(keys.dead, {"bad-count": time.time() * 1000})
    r.hset(keys.body, "bad-count", b"{}")
    r.hset(keys.deliv, "bad-count", b"many")
    r.sadd(queues_key(stack.settings.prefix), b"\xc3\x28-queue")
    second = stack.broker.keys(SECOND_QUEUE)
    r.sadd(queues_key(stack.settings.prefix), SECOND_QUEUE)
    r.set(second.stats, "not a hash")
    r.zadd(second.ready, {"odd": 1})
    odd = {"body": "%%%", "properties": {"body_encoding": "base64"}}
    r.hset(second.body, "odd", json.dumps(odd))

    pages = {
        url: client.get(url)
        for url in [
            "/",
            "/dead",
            f"/queues/{DEFAULT_QUEUE}?state=DEAD",
            f"/queues/{SECOND_QUEUE}",
            f"/dead/record?queue={DEFAULT_QUEUE}&key=not-json",
            f"/dead/record?queue={DEFAULT_QUEUE}&key=bad-count",
            "/message?id=bad-count",
        ]
    }

    assert {url: p.status_code for url, p in pages.items() if p.status_code >= 500} == {}
    overview = pages["/"].text
    assert "2 unreadable queue entries" in overview
    assert re.search(r'data-queue="second">.*?unreadable: WRONGTYPE', overview, re.S)
    dead = pages["/dead"].text
    assert set(good) <= set(_ids(dead)) and "not-json" in _ids(dead)
    assert "unreadable records skipped" in dead
    assert "unreadable-record" in dead
    assert "unreadable entr" in pages[f"/queues/{DEFAULT_QUEUE}?state=DEAD"].text
    assert "odd" in pages[f"/queues/{SECOND_QUEUE}"].text
    assert "unreadable-record" in pages[f"/dead/record?queue={DEFAULT_QUEUE}&key=not-json"].text
    # A field that is not a number does not hide its message: it is shown, the count not read.
    bad_count = pages[f"/dead/record?queue={DEFAULT_QUEUE}&key=bad-count"]
    assert bad_count.status_code == 200 and "bad-count" in bad_count.text
    assert "DEAD" in pages["/message?id=bad-count"].text


def test_a_broker_that_does_not_answer_gives_a_503_page_and_the_pages_come_back(
    fresh_server: Server, prefix: str
):
    client = redis.Redis.from_url(fresh_server.url, socket_timeout=2, socket_connect_timeout=2)
    broker = Broker(client, prefix=prefix)
    broker.declare(DEFAULT_QUEUE)
    with TestClient(create_app(Dashboard(broker))) as web:
        assert web.get("/").status_code == 200
        fresh_server.process.kill()

        down = {url: web.get(url) for url in ["/", "/dead", f"/queues/{DEFAULT_QUEUE}"]}

        assert {url: r.status_code for url, r in down.items()} == dict.fromkeys(down, 503)
        assert all("The broker did not answer" in r.text for r in down.values())
        fresh_server.process.restart()
        assert web.get("/").status_code == 200
    client.close()


def test_a_bad_age_filter_is_reported_on_the_page_and_left_out(stack: Stack, client: TestClient):
    ids = _fill_dead(stack, DEFAULT_QUEUE, 2)

    page = client.get("/dead?older_than=soon")

    assert page.status_code == 200
    assert "older than: &#39;soon&#39; is not a duration like 90s" in page.text
    assert _ids(page.text) == ids


def test_every_page_and_action_works_as_the_readme_acl_user(
    server_factory: Callable[..., Server], prefix: str
):
    acl = server_factory(config=[readme_acl(prefix, "app-pw")])
    client = redis.Redis(port=acl.process.port, username="celery", password="app-pw")
    broker = Broker(client, prefix=prefix)
    broker.declare(DEFAULT_QUEUE)
    broker.publish(DEFAULT_QUEUE, "r1", "{}", 0)
    broker.publish(DEFAULT_QUEUE, "s1", "{}", 0, due_ms=broker.now_ms() + 60_000)
    [lease] = broker.reserve([DEFAULT_QUEUE], 1, "c1")
    broker.bury(DEFAULT_QUEUE, "d1", b"{}", band=0, deliveries=1, reason="failed", detail="x")
    broker.bury(DEFAULT_QUEUE, "d2", b"{}", band=0, deliveries=1, reason="poison", detail="x")
    dashboard = Dashboard(broker, sampler=sampler_for(broker, interval=60))
    with TestClient(create_app(dashboard)) as web:
        urls = ["/", "/overview/rows", "/dead", "/dead?task=x*", "/message?id=r1"] + [
            f"/queues/{DEFAULT_QUEUE}?state={s}" for s in ("READY", "RESERVED", "SCHEDULED", "DEAD")
        ]
        assert {u: web.get(u).status_code for u in urls} == dict.fromkeys(urls, 200)
        assert web.get(f"/dead/record?queue={DEFAULT_QUEUE}&key=d1").status_code == 200
        token = _csrf(web)
        for op, reason in (("replay", "failed"), ("purge", "poison")):
            done = web.post(
                "/dead/action",
                data={
                    "op": f"{op} matching",
                    "reason": reason,
                    "confirm": "yes",
                    CSRF_FIELD: token,
                },
            )
            past = "Replayed" if op == "replay" else "Purged"
            assert f"{past} 1 of 1 dead message" in done.text
    assert broker.counts(DEFAULT_QUEUE) == {"ready": 1, "reserved": 1, "scheduled": 1, "dead": 0}
    assert lease.key == "r1"
    with acl.process.client() as admin:
        assert _denied(admin, "celery") == []
    client.close()
