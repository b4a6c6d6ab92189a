"""How fast the dashboard's pages are on big brokers (issue #12: 6).

    python -m bench.dashboard                      # 1,000 queues, 100,000 dead letters, 5 runs
    python -m bench.dashboard --queues 100 --dead 10000 --runs 3

Against a fresh server (never the Redis on 6379): ``--queues`` queues, each with a few ready
messages and counters, and one queue holding ``--dead`` dead letters. Each page is requested
through the whole application (routing, middleware, Redis reads, Jinja2 rendering; Starlette's
in-process client, so no socket in between) ``--runs`` times; the median and the slowest are
printed as a markdown table. The overview is rendered with a full rate window (60 readings)
in which every queue's counters moved, so every row draws its two sparklines (the worst case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import redis
from starlette.testclient import TestClient

from celery_msg.core import Broker, ScriptCall, failure_record
from celery_msg.counters import reason_word
from celery_msg.testing import ServerProcess
from celery_msg.web import Dashboard, create_app
from celery_msg.web.app import sampler_for

DEAD_QUEUE = "dead-heavy"


def populate(broker: Broker, queues: int, dead: int) -> None:
    """``queues`` queues with 3 ready messages each, and ``dead`` dead letters in one more."""
    for i in range(queues):
        name = f"queue-{i:04d}"
        broker.declare(name)
        for j in range(3):
            message_id = f"{name}-{j}"
            payload = json.dumps({"headers": {"id": message_id, "task": "t"}})
            broker.publish(name, message_id, payload, 0)
    broker.declare(DEAD_QUEUE)
    keys = broker.keys(DEAD_QUEUE).all
    now = broker.now_ms()
    batch: list[ScriptCall] = []
    for n in range(dead):
        message_id = f"dead-{n:06d}"
        payload = json.dumps({"headers": {"id": message_id, "task": f"reports.r{n % 10}"}})
        record = json.dumps(failure_record("failed", "ValueError: x", now, task="reports.r"))
        args = [now, message_id, payload, 0, 1, record, reason_word("failed")]
        batch.append((broker.scripts.bury.script, keys, args))
        if len(batch) >= 1000:
            broker.run_scripts(batch)
            batch.clear()
    if batch:
        broker.run_scripts(batch)


def timed(runs: int, request: Callable[[], object]) -> tuple[float, float]:
    """Median and slowest wall time (ms) of ``request`` over ``runs`` calls, after a warm-up."""
    request()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--dead", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--server", choices=("redis", "valkey"), default="redis")
    args = parser.parse_args(argv)

    with ServerProcess(args.server) as server:
        client = redis.Redis.from_url(server.url)
        broker = Broker(client, prefix="bench-web:")
        start = time.perf_counter()
        populate(broker, args.queues, args.dead)
        print(f"populated in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        sampler = sampler_for(broker)
        for n in range(60):  # a full window, every queue busy: every row draws two lines
            pipe = client.pipeline(transaction=False)
            for i in range(args.queues):
                stats = broker.keys(f"queue-{i:04d}").stats
                pipe.hincrby(stats, "published", 1 + (i + n) % 7)
                pipe.hincrby(stats, "acked", 1 + (i * n) % 5)
            pipe.execute()
            sampler.sample()
        app = create_app(Dashboard(broker, None, sampler))
        rows = []
        with TestClient(app) as web:

            def get(url: str) -> Callable[[], object]:
                def request() -> object:
                    response = web.get(url)
                    assert response.status_code == 200, (url, response.status_code)
                    return response

                return request

            last_rank = max(0, args.dead - 50)
            pages = [
                (f"overview, {args.queues + 1} queues", "/"),
                ("overview rows (the 5 s refresh)", "/overview/rows"),
                (f"dead letters, first page of {args.dead:,}", f"/dead?queue={DEAD_QUEUE}"),
                (f"dead letters, last page of {args.dead:,}", f"/dead?cursor=0.{last_rank}"),
                (
                    "dead letters, a filter matching none (reads at most 5,000)",
                    f"/dead?queue={DEAD_QUEUE}&task=nothing.*",
                ),
                (
                    "one dead letter's record",
                    f"/dead/record?queue={DEAD_QUEUE}&key=dead-{args.dead // 2:06d}",
                ),
                ("a queue page (ready)", "/queues/queue-0000"),
            ]
            for what, url in pages:
                median, worst = timed(args.runs, get(url))
                rows.append((what, median, worst))
            size = len(web.get("/").content)

        def draw() -> float:
            sampler.sample()  # a new reading: the next page draws every chart again
            start = time.perf_counter()
            sampler.charts()
            return time.perf_counter() - start

        drawn = sorted(draw() * 1000 for _ in range(args.runs))
        rows.append(
            (f"drawing the {2 * args.queues:,} sparklines (once per reading)",
             statistics.median(drawn), drawn[-1])
        )  # fmt: skip
        client.close()

    print(f"| page ({args.runs} runs, {args.server}) | median ms | slowest ms |")
    print("|---|---:|---:|")
    for what, median, worst in rows:
        print(f"| {what} | {median:.0f} | {worst:.0f} |")
    print(f"\noverview page: {size / 1e6:.2f} MB of HTML")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
