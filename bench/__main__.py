"""``python -m bench``: celery-msg against kombu's redis transport on one fresh server.

Prints the markdown table to stdout (progress goes to stderr) and writes
``bench/results/latest.{md,json}`` (``quick.{md,json}`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
import traceback
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery_msg.testing import ServerProcess

from . import report
from .common import Bench, Settings
from .suite import GROUPS, log
from .worker import kill_all

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, 1 run: a smoke check")
    parser.add_argument("--runs", type=int, help="runs per measurement (median); default 3")
    parser.add_argument(
        "--only",
        help=f"comma-separated groups to run, of: {', '.join(GROUPS)} (default: all)",
    )
    parser.add_argument("--server", choices=("redis", "valkey"), default="redis")
    parser.add_argument("--raw-n", type=int, help="messages per raw run (default 20000)")
    parser.add_argument("--e2e-n", type=int, help="tasks per end-to-end run (default 10000)")
    parser.add_argument("--eta-n", type=int, help="countdown tasks per eta memory run (100000)")
    parser.add_argument("--chaos-n", type=int, help="tasks per chaos run (default 20000)")
    parser.add_argument(
        "--chaos-single-kills", type=int, help="SIGKILLs per single-worker chaos run (default 8)"
    )
    parser.add_argument("--memory-n", type=int, help="waiting messages for memory (100000)")
    parser.add_argument("--bulk-group-n", type=int, help="tasks in the bulk group (10000)")
    parser.add_argument("--bulk-delay-n", type=int, help=".delay() calls per bulk run (100000)")
    parser.add_argument("--output", help="result file name in bench/results (default: latest)")
    args = parser.parse_args(argv)
    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    args.groups = groups
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def settings(args: argparse.Namespace) -> Settings:
    s = Settings().quicken() if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.runs is not None:
        changes["runs"] = args.runs
    if args.raw_n is not None:
        changes["raw_n"] = args.raw_n
    if args.e2e_n is not None:
        changes["e2e_n"] = args.e2e_n
    if args.eta_n is not None:
        changes["eta_n"] = args.eta_n
    if args.chaos_n is not None:
        changes["chaos_n"] = args.chaos_n
    if args.chaos_single_kills is not None:
        changes["chaos_single_kills"] = args.chaos_single_kills
    if args.memory_n is not None:
        changes["memory_n"] = args.memory_n
    if args.bulk_group_n is not None:
        changes["bulk_group_n"] = args.bulk_group_n
    if args.bulk_delay_n is not None:
        changes["bulk_delay_n"] = args.bulk_delay_n
    return replace(s, **changes)


def main(argv: list[str]) -> int:
    args = parse(argv)
    s = settings(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that cleanup runs
    started, load_start = time.monotonic(), os.getloadavg()
    results: dict[str, Any] = {}
    failed: list[str] = []
    server = ServerProcess(args.server)
    try:
        server.start()
        bench = Bench(server, s)
        server_desc = f"{server.kind}-server {server.version} (fresh, no persistence)"
        log(f"benchmarking on {server_desc}, port {server.port}; settings {s}")
        for name in args.groups:
            try:
                results.update(GROUPS[name](bench))
            except Exception:  # one broken group must not throw away the others' results
                log(f"group {name} FAILED:\n{traceback.format_exc()}")
                failed.append(name)
        bench.close()
    finally:
        kill_all()
        server.close()
    meta = {
        "command": "python -m bench " + shlex.join(argv) if argv else "python -m bench",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.monotonic() - started,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": report.machine(),
        "server": server_desc,
        "settings": asdict(s),
        "groups": args.groups,
        "notes": NOTES,
    }
    name = args.output or ("quick" if args.quick else "latest")
    print(report.write(RESULTS, name, meta, results))
    log(f"wrote {RESULTS / name}.md and .json")
    if failed:
        log(f"FAILED groups: {', '.join(failed)}")
        return 1
    return 0


NOTES = [
    "Both transports run against the same fresh server, alternating within each run; "
    "other processes on the machine (a shared 2-core box) load both alike, but absolute "
    "numbers move with that load.",
    "raw: kombu Producer/Consumer, anonymous exchange (as Celery publishes), prefetch_count "
    "100, a callback that acks; every message is checked to arrive exactly once.",
    "e2e: same app code on both; the celery-msg app also calls celery_msg.configure(app). "
    "Throughput = N / (last task done - worker ready). Worker flags: --without-mingle "
    "--without-gossip --without-heartbeat -l warning.",
    "recovery: an acks_late task sleeping 30 s on a -P solo worker, SIGKILL of its process "
    "group, a second worker started at once. celery-msg uses its default lease_timeout (10 s). "
    "kombu redis redelivers only from a periodic restore sweep (every unacked_restore_interval "
    "x unacked_restore_throttle = 10 x 10 s by default, plus once at worker start-up) and only "
    "messages older than visibility_timeout.",
    "eta: -P solo worker. Memory: RSS growth of the worker's process group (psutil) after "
    "eta_n tasks with countdown=3600 were published and received (kombu: its queue list empty, "
    "all in unacked; celery-msg: all counted as scheduled) and RSS stopped growing; server = "
    "growth of used_memory; 'ran' counts any of them that ran (must be 0). Lateness: tasks with "
    "ETAs 5-10 s ahead, 4 per due time; lateness = task start - eta (same clock); early starts "
    "and tasks run twice or never are totals over all runs.",
    "chaos: N acks_late tasks of 3 ms through two workers (-P prefork -c 2 and -P solo), each "
    "behind its own TCP proxy, against a fresh redis-server with AOF appendfsync always; "
    "celery-msg lease_timeout 5 s, kombu visibility_timeout 30 s. Faults (seed = run number, "
    "the same for both transports): a worker SIGKILLed (process group) every 3-5 s and "
    "restarted under the same name, until every task was published and fetched; at 15/45/85 % "
    "of tasks finished CLIENT KILL of the workers' connections, at 30/70 % Redis SIGKILLed and "
    "restarted 1 s later from its AOF, at 55 % the solo worker's proxy partitioned for 6 s. "
    "The publisher keeps at most 1,000 tasks ahead and retries a publish that raises (after "
    "Celery's own 3 retries) with the same task id. Every start and finish is recorded by the "
    "task on the bench's own server (never faulted). lost = never finished; duplicate "
    "completions/starts = finishes/starts beyond the first; recovery = SIGKILL -> first new "
    "start of a task the killed worker had started last (running, or finished and not yet "
    "acked; median over kills). A run ends when all tasks finished and the broker holds "
    "nothing (so a late redelivery of a finished task still counts), or when nothing finished "
    "for 5 s and the broker holds nothing (the rest is lost for good), or chaos_drain s after "
    "the faults. When nothing finished for 5 s and the last kill is older than the timeout, "
    "the idle workers are restarted (kombu restores expired unacked messages at start-up; "
    "its own sweep would do it within ~100 s). Each duplicate is attributed (bench.chaos."
    "attribute) to what happened between the run before it and its own start: a SIGKILL of the "
    "incarnation that ran it before (running, or finished with its ack not landed); else the "
    "partition, if either run was on the partitioned worker and the partition overlaps "
    "[previous start - 5 s, this start]; else a Redis restart or CLIENT KILL in that window; "
    "else a publish that was retried (two messages of one task); else unexplained. A duplicate "
    "completion takes the cause of its run's start.",
    "chaos single worker: one worker (solo; prefork -c 2; threads -c 2), N tasks of 3 ms "
    "published up front, SIGKILL at 1/9 .. 8/9 of them finished, restarted at once; figure = "
    "duplicate completions per kill.",
    "memory: N Celery task messages waiting in one queue (no worker), each stored by kombu's "
    "redis transport in 939 B (its JSON envelope); growth of used_memory per message and "
    "MEMORY USAGE (SAMPLES 0) of every key.",
    "long task: an acks_late task sleeping 15 s on a -P solo worker, with lease_timeout (ours) "
    "or visibility_timeout (kombu) of 5 s; a second worker starts after 6 s. kombu restores the "
    "still-running message at that worker's start-up, so it runs twice; ours is renewed.",
]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
