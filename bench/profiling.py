"""Where the time goes: cProfile of one raw phase, in this process, against a fresh server.

    python -m bench.profiling publish            # celery-msg, 1 queue, N=20000
    python -m bench.profiling consume --queues 4 --transport redis

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

from celery_msg.testing import ServerProcess

from . import raw
from .common import OURS, TRANSPORTS, Bench, Settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    parser.add_argument("phase", choices=("publish", "consume"))
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
