"""What a Sentinel failover loses, and what ``min_replicas`` costs (issue 11).

    python -m bench.failover                     # 5 kills per configuration, redis-server
    python -m bench.failover --kills 3 --server valkey

For each configuration, ``--kills`` times: a fresh master with two replicas and three sentinels
(:class:`celery_msg.topologies.SentinelTopology`, the same binary), a kombu producer publishing
as fast as it can through the sentinels (``retry=True``, so it rides through the failover);
after ``--warmup`` seconds the replicas lag: SIGSTOPped for ``--lag`` seconds (a network
hiccup; 0 = no lag), then the master is SIGKILLed at whatever point the publisher is and the
replicas resume; the publisher goes on until it has published ``--after`` more, then every
message left in the queue is read back. *lost* = publishes that returned to the caller and are
not in the queue on the new master. The publish rate is measured before the lag.

Configurations: celery-msg (``min_replicas=0``, the default), celery-msg ``min_replicas=1``,
and kombu's own ``sentinel://`` transport (``redis``), in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from kombu import Connection, Queue
from kombu.message import Message

import celery_msg  # noqa: F401  (registers the URL schemes)
from celery_msg.testing import ServerKind
from celery_msg.topologies import SentinelTopology

RETRY = {"max_retries": 60, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.5}


@dataclass
class Config:
    label: str
    scheme: str  # URL scheme of each sentinel part
    options: dict[str, Any] = field(default_factory=dict)


CONFIGS = (
    Config("celery-msg, min_replicas=0", "celery-msg+sentinel"),
    Config("celery-msg, min_replicas=1", "celery-msg+sentinel", {"min_replicas": 1}),
    Config("kombu sentinel://", "sentinel"),
)


@dataclass
class Outcome:
    returned: int
    lost: int
    failed: int
    rate: float


def one_kill(kind: ServerKind, config: Config, warmup: float, lag: float, after: int) -> Outcome:
    with SentinelTopology(kind, replicas=2) as topology:
        url = ";".join(f"{config.scheme}://127.0.0.1:{s.port}/0" for s in topology.sentinels)
        options: dict[str, Any] = {
            "master_name": topology.master_name,
            "socket_timeout": 2.0,
            **config.options,
        }
        if config.scheme.startswith("celery-msg"):
            options.update(key_prefix=f"failover-{uuid4().hex[:8]}:", min_replicas_timeout=2.0)
        queue = Queue(f"failover-{uuid4().hex[:8]}")
        returned: list[int] = []
        failed: list[str] = []
        stop = threading.Event()
        publisher = threading.Thread(
            target=publish_stream, args=(url, options, queue, returned, failed, stop), daemon=True
        )
        publisher.start()
        time.sleep(warmup)
        before = len(returned)
        rate = before / warmup
        old = topology.master_port()
        with topology.replicas_lagging(lag):
            topology.server_on(old).kill()
        topology.wait_for_failover(old)
        deadline = time.monotonic() + 120
        while len(returned) < before + after and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        publisher.join(30)
        received = drain(url, options, queue)
        lost = len(set(returned) - set(received))
        return Outcome(len(returned), lost, len(failed), rate)


def publish_stream(
    url: str,
    options: dict[str, Any],
    queue: Queue,
    returned: list[int],
    failed: list[str],
    stop: threading.Event,
) -> None:
    """Publish ``{"n": 0}``, ``{"n": 1}``, ... to ``queue`` as fast as one kombu producer can
    (``retry=True``, riding through a failover) until ``stop``: ``returned`` gets each ``n``
    whose publish returned, ``failed`` the error of each that raised (no claim is made)."""
    with Connection(url, transport_options=options) as conn:
        producer = conn.Producer()
        n = 0
        while not stop.is_set():
            try:
                producer.publish(
                    {"n": n},
                    routing_key=queue.name,
                    declare=[queue],
                    retry=True,
                    retry_policy=RETRY,
                )
            except Exception as exc:
                failed.append(type(exc).__name__)
            else:
                returned.append(n)
            n += 1


def drain(url: str, options: dict[str, Any], queue: Queue) -> list[int]:
    received: list[int] = []

    def on_message(body: dict[str, int], message: Message) -> None:
        received.append(body["n"])
        message.ack()

    with (
        Connection(url, transport_options=options) as conn,
        conn.Consumer([queue], callbacks=[on_message], prefetch_count=500),
    ):
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 2.0:
            count = len(received)
            with contextlib.suppress(TimeoutError, socket.timeout):
                conn.drain_events(timeout=0.5)
            if len(received) > count:
                idle_since = time.monotonic()
    return received


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the kill")
    parser.add_argument("--lag", type=float, default=0.5, help="seconds replicas lag")
    parser.add_argument("--after", type=int, default=300, help="publishes after the failover")
    parser.add_argument("--server", choices=("redis", "valkey"), default="redis")
    args = parser.parse_args(argv)
    rows = []
    for config in CONFIGS:
        outcomes = []
        for kill in range(1, args.kills + 1):
            out = one_kill(args.server, config, args.warmup, args.lag, args.after)
            outcomes.append(out)
            print(
                f"{config.label}, kill {kill}: {out.returned:,} returned, lost {out.lost}, "
                f"failed {out.failed}, {out.rate:,.0f} publishes/s before the kill",
                file=sys.stderr,
                flush=True,
            )
        rows.append((config.label, outcomes))
    print(f"`python -m bench.failover {' '.join(argv)}`".replace(" `", "`"))
    print()
    print("| configuration | kills | publishes lost per kill (each kill) | publish rate, median |")
    print("|---|---:|---|---:|")
    for label, outcomes in rows:
        each = ", ".join(str(o.lost) for o in outcomes)
        mean = statistics.mean(o.lost for o in outcomes)
        rate = statistics.median(o.rate for o in outcomes)
        print(f"| {label} | {len(outcomes)} | {mean:.1f} ({each}) | {rate:,.0f}/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
