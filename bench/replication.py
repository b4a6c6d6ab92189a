"""What ``min_replicas=1`` costs per publish (issue 11).

    python -m bench.replication                   # 3 runs, 5,000 publishes each, redis-server
    python -m bench.replication --runs 3 --n 5000 --server valkey

Per run: a fresh master with one replica (:class:`~celery_msg.topologies.SentinelTopology`, the
same binary; the clients talk to the master directly, as a Sentinel client does once it found
it), a kombu producer per configuration, each publishing ``--n`` messages of ``--size`` bytes
one after the other (``Producer.publish``, as Celery's ``apply_async`` does), each publish timed
alone; the configurations take turns every ``--block`` publishes, so that load from elsewhere on
the machine falls on all of them alike. *publishes/s* is publishes over the time spent in them.

Configurations: celery-msg with ``min_replicas`` 0 (the default) and 1 (every publish ends with
``WAIT 1`` in the same round trip), and kombu's ``redis://`` transport as reference. Reported:
publishes/s and the p50 / p99 latency of one publish, medians over the runs, and the ratios to
``min_replicas=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kombu import Connection, Queue

import celery_msg  # noqa: F401  (registers the URL schemes)
from celery_msg.testing import ServerKind
from celery_msg.topologies import SentinelTopology

from .common import new_prefix, percentile

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    label: str
    scheme: str
    options: dict[str, Any]


CONFIGS = (
    Config("celery-msg, min_replicas=0", "celery-msg", {}),
    Config("celery-msg, min_replicas=1", "celery-msg", {"min_replicas": 1}),
    Config("kombu redis://", "redis", {}),
)


@dataclass
class Sample:
    rate: float
    p50_ms: float
    p99_ms: float


@dataclass
class Publisher:
    """One configuration's producer, and the time each of its publishes took."""

    config: Config
    producer: Any
    queue: Queue
    latencies: list[float]

    def publish(self, body: dict[str, str], count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            self.producer.publish(body, routing_key=self.queue.name)
            self.latencies.append(time.perf_counter() - started)

    def sample(self) -> Sample:
        return Sample(
            len(self.latencies) / sum(self.latencies),
            percentile(self.latencies, 50) * 1000,
            percentile(self.latencies, 99) * 1000,
        )


def one_run(kind: ServerKind, n: int, size: int, block: int) -> dict[str, Sample]:
    """The configurations take turns, ``block`` publishes each, so that a burst of load from
    elsewhere on the machine falls on all of them alike."""
    body = {"pad": "x" * size}
    with SentinelTopology(kind, replicas=1, sentinels=1) as topology, ExitStack() as stack:
        port = topology.master.port
        publishers = []
        for config in CONFIGS:
            options = dict(config.options)
            prefix_option = "key_prefix" if config.scheme == "celery-msg" else "global_keyprefix"
            options[prefix_option] = new_prefix("replication") + ":"
            url = f"{config.scheme}://127.0.0.1:{port}/0"
            conn = stack.enter_context(Connection(url, transport_options=options))
            queue = Queue(new_prefix("replication"))
            producer = conn.Producer()
            producer.publish(body, routing_key=queue.name, declare=[queue])  # warm up
            publishers.append(Publisher(config, producer, queue, []))
        done = 0
        while done < n:
            count = min(block, n - done)
            for publisher in publishers:
                publisher.publish(body, count)
            done += count
        out = {p.config.label: p.sample() for p in publishers}
    for label, sample in out.items():
        print(
            f"  {label}: {sample.rate:,.0f}/s, p50 {sample.p50_ms:.3f} ms, "
            f"p99 {sample.p99_ms:.3f} ms",
            file=sys.stderr,
            flush=True,
        )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=5000, help="publishes per configuration")
    parser.add_argument("--size", type=int, default=256, help="bytes of padding per message")
    parser.add_argument("--block", type=int, default=100, help="publishes per turn")
    parser.add_argument("--server", choices=("redis", "valkey"), default="redis")
    parser.add_argument("--out", help="results name under bench/results (default: none)")
    args = parser.parse_args(argv)
    runs: list[dict[str, Sample]] = []
    for run in range(1, args.runs + 1):
        print(f"run {run}/{args.runs}", file=sys.stderr, flush=True)
        runs.append(one_run(args.server, args.n, args.size, args.block))
    command = "python -m bench.replication " + " ".join(argv)
    load = os.getloadavg()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    base = {
        field: statistics.median(getattr(r[CONFIGS[0].label], field) for r in runs)
        for field in ("rate", "p50_ms", "p99_ms")
    }
    lines = [
        f"`{command.strip()}` ({when}, load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f}; medians of {args.runs})",
        "",
        "| configuration | publishes/s | p50 ms | p99 ms | rate vs min_replicas=0 |",
        "|---|---:|---:|---:|---:|",
    ]
    table: dict[str, dict[str, float]] = {}
    for config in CONFIGS:
        med = {
            field: statistics.median(getattr(r[config.label], field) for r in runs)
            for field in ("rate", "p50_ms", "p99_ms")
        }
        table[config.label] = med
        lines.append(
            f"| {config.label} | {med['rate']:,.0f} | {med['p50_ms']:.3f} | "
            f"{med['p99_ms']:.3f} | {med['rate'] / base['rate']:.2f}x |"
        )
    print("\n".join(lines))
    if args.out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
        raw = {
            "command": command.strip(),
            "date": when,
            "loadavg": load,
            "server": args.server,
            "medians": table,
            "runs": [{k: asdict(v) for k, v in r.items()} for r in runs],
        }
        (RESULTS / f"{args.out}.json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
