"""Instructions per published task, counted by callgrind: a figure that the machine's load
does not move (timings on the shared 2-core VM move by 2x between runs).

    python -m bench.instructions group-bulk --n 2000              # runs itself under valgrind
    python -m bench.instructions delay --transport redis --n 2000
    python -m bench.instructions worker-solo --n 3000             # the consuming side

The phases are :mod:`bench.profiling`'s (``delay``, ``delay-bulk``, ``group``, ``group-bulk``),
``worker-solo`` (a real ``celery worker -P solo`` under valgrind drains pre-published no-op
tasks, the e2e benchmark's, which each do one INCR on the bench server; counted from the 200th
task to the last, divided by the tasks finished meanwhile),
and two floors (diagnostics: something is stubbed out in the counted process, never in a bench):

- ``*-nopublish``: the transport's ``basic_publish`` does nothing: what Celery and kombu cost
  per task by themselves, the least any publish through Celery's per-task path can cost
  (``delay-bulk-nopublish``: inside a bulk block, with its held producer);
- ``group-frame``: every signature's ``apply_async`` does nothing: what ``group.apply_async``
  costs around its tasks (cloning and freezing each signature, its result, the barrier, the
  ``GroupResult``), the least a group can cost while its results are tracked as Celery does.
Counting is switched on (``callgrind_control -i on``) only around the timed body, after a
warm-up of the same body, so imports, connecting and declaring are not counted. The Redis
server runs outside valgrind: only the client's instructions are counted. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from celery_msg import canvas
from celery_msg.testing import ServerProcess

from .common import OURS, TRANSPORTS
from .profiling import CELERY_PHASES
from .tasks import make_app

#: Set in the child that runs under valgrind.
_CHILD = "BENCH_UNDER_CALLGRIND"


def _counting(on: bool) -> None:
    _toggle(os.getpid(), on)


#: Diagnostic phases: (the phase they stub, what is stubbed).
FLOORS = {
    "delay-nopublish": ("delay", "basic_publish"),
    "delay-bulk-nopublish": ("delay-bulk", "basic_publish"),
    "group-nopublish": ("group", "basic_publish"),
    "group-frame": ("group", "apply_async"),
}


def _stub(what: str, transport: str) -> None:
    if what == "apply_async":
        from celery.canvas import Signature

        Signature.apply_async = lambda self, *args, **kwargs: None
    elif transport == OURS:
        from celery_msg.transport import Channel

        Channel.basic_publish = lambda self, *args, **kwargs: None
    else:
        from kombu.transport.redis import Channel as RedisChannel

        RedisChannel.basic_publish = lambda self, *args, **kwargs: None


def _child(phase: str, transport: str, n: int) -> None:
    stub = FLOORS.get(phase)
    if stub is not None:
        phase = stub[0]
    body, bulk_groups = CELERY_PHASES[phase]
    with ServerProcess("redis") as server:
        app = make_app(f"{transport}://127.0.0.1:{server.port}/0")
        if transport == OURS and not bulk_groups:
            canvas.uninstall(app)
        task = app.tasks["bench.noop"]
        body(app, task, min(n, 200))  # warm-up: lazy imports, caches, the connection
        if stub is not None:
            _stub(stub[1], transport)
        _counting(True)
        body(app, task, n)
        _counting(False)
        app.close()


#: Tasks a counted worker runs before counting starts (start-up, lazy imports, caches).
WORKER_WARMUP = 200


def _worker(transport: str, n: int, out: str) -> tuple[int, int]:
    """(instructions, tasks) of a ``-P solo`` worker under callgrind draining ``n`` tasks."""
    import signal
    import time
    from dataclasses import replace

    from .celery_e2e import publish
    from .common import Bench, Settings, new_prefix, wait_for
    from .worker import Worker

    class CountedWorker(Worker):
        def command(self) -> list[str]:
            callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
            return [*callgrind, f"--callgrind-out-file={out}", *super().command()]

    with ServerProcess("redis") as server:
        total = n + WORKER_WARMUP
        bench = Bench(server, replace(Settings(), e2e_n=total))
        publish(bench, transport, total)
        prefix = new_prefix("e2e")
        done_key = f"{prefix}:done"
        with CountedWorker(bench, transport, prefix, pool="solo") as worker:
            worker.wait_ready(timeout=600)
            wait_for(lambda: int(bench.client.get(done_key) or 0) >= WORKER_WARMUP, 600, 0.05)
            _toggle(worker.pid, True)
            first = int(bench.client.get(done_key) or 0)
            wait_for(lambda: bench.client.get(f"{prefix}:last"), timeout=3600, interval=0.05)
            _toggle(worker.pid, False)
            counted = total - first
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)  # callgrind writes its totals at exit
            worker.proc.wait(600)
            time.sleep(0.5)
        bench.close()
    with open(out, encoding="utf-8") as dump:
        found = re.search(r"^totals: (\d+)", dump.read(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no totals in {out}")
    return int(found.group(1)), counted


def _toggle(pid: int, on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(pid)],
        check=True,
        capture_output=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("phase", choices=(*CELERY_PHASES, *FLOORS, "worker-solo"))
    parser.add_argument("--transport", choices=TRANSPORTS, default=OURS)
    parser.add_argument("--n", type=int, default=2_000)
    parser.add_argument("--keep", help="also keep callgrind's output file here")
    args = parser.parse_args(argv)
    if os.environ.get(_CHILD):
        _child(args.phase, args.transport, args.n)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "callgrind.out")
        if args.phase == "worker-solo":
            instructions, tasks = _worker(args.transport, args.n, out)
            print(
                f"{args.transport} worker -P solo, {tasks} tasks counted: "
                f"{instructions / tasks:,.0f} instructions per task (callgrind, worker only)"
            )
            return 0
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.instructions",
            *argv,
        ]
        env = {**os.environ, _CHILD: "1", "PYTHONHASHSEED": "0"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stdout, done.stderr, file=sys.stderr)
            return done.returncode
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            print(done.stderr, file=sys.stderr)
            return 1
        total = int(found.group(1))
    print(
        f"{args.transport} {args.phase}, N={args.n}: {total / args.n:,.0f} instructions per task "
        f"(callgrind, client only)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
