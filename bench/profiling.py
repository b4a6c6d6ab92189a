"""Where the time goes: cProfile of one raw phase, in this process, against a fresh server.

    python -m bench.profiling publish            # celery-msg, 1 queue, N=20000
    python -m bench.profiling consume --queues 4 --transport redis
    python -m bench.profiling delay --n 10000    # Celery .delay() one by one (delay-bulk: in a
                                                 # bulk block; group, group-bulk: a group)

Prints the top functions by own time and by cumulative time, and the server's CPU per message
(a Lua-heavy transport shows up there, not in the Python profile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from celery_msg import canvas
from celery_msg.testing import ServerKind, ServerProcess

from . import bulk, raw
from .common import OURS, TRANSPORTS, Bench, Settings
from .tasks import make_app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    parser.add_argument("phase", choices=("publish", "consume", *CELERY_PHASES))
    parser.add_argument("--transport", choices=TRANSPORTS, default=OURS)
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--server", choices=("redis", "valkey"), default="redis")
    parser.add_argument("--save", help="also write the raw profile to this file")
    args = parser.parse_args(argv)

    profiler = cProfile.Profile()

    @contextmanager
    def hook(phase: str) -> Iterator[None]:
        if phase != args.phase:
            yield
            return
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()

    if args.phase in CELERY_PHASES:
        return _celery(args.phase, args.transport, args.n, args.server, args.top, profiler)
    with ServerProcess(args.server) as server:
        bench = Bench(server, replace(Settings(), raw_n=args.n))
        out = raw.run(bench, args.transport, args.queues, hook)
        bench.close()
    print(
        f"{args.transport} {args.phase}, {args.queues} queue(s), N={args.n}: "
        f"{out[args.phase]:,.0f} msgs/s under the profiler; CPU per message: "
        f"client {out[args.phase + '_client_cpu_us']:.0f} us, "
        f"server {out[args.phase + '_server_cpu_us']:.0f} us"
    )
    if args.save:
        profiler.dump_stats(args.save)
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


#: Celery publishing phases: .delay() one by one / in a bulk block; a group as it is / in bulk.
CELERY_PHASES = {
    "delay": (bulk._delays, False),
    "delay-bulk": (bulk._delays_in_block, True),
    "group": (bulk._group, False),
    "group-bulk": (bulk._group, True),
}


def _celery(
    phase: str, transport: str, n: int, kind: ServerKind, top: int, profiler: cProfile.Profile
) -> int:
    """Profile Celery publishing ``n`` tasks; prints the share of time in celery-msg's own
    code (the rest is Celery, kombu, redis-py and waiting for Redis)."""
    body, bulk_groups = CELERY_PHASES[phase]
    with ServerProcess(kind) as server:
        app = make_app(f"{transport}://127.0.0.1:{server.port}/0")
        if transport == OURS and not bulk_groups:
            canvas.uninstall(app)
        task = app.tasks["bench.noop"]
        task.delay(0)
        profiler.enable()
        body(app, task, n)
        profiler.disable()
        app.close()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    ours = sum(v[2] for k, v in stats.stats.items() if "/celery_msg/" in k[0])  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    print(
        f"{transport} {phase}, N={n}: {1e6 * total / n:.0f} us per task under the profiler, "
        f"{1e6 * ours / n:.0f} us ({100 * ours / total:.0f} %) of it in celery_msg's own code"
    )
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
