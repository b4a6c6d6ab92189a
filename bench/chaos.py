"""Chaos: N ``acks_late`` tasks through two workers while workers, connections and Redis fail.

One measurement (:func:`run`) starts a fresh ``redis-server`` with AOF ``appendfsync always``
(the broker, and the only server that is faulted), a :class:`~bench.proxy.TcpProxy` per worker
between it and that worker, and two workers (``-P prefork -c 2`` and ``-P solo``). A publisher
thread publishes N tasks of 3 ms (at most ``chaos_backlog`` ahead of the finished ones, so
publishing overlaps the faults), retrying a publish that raises with the same task id after
Celery's own retry policy (3 retries) gave up. Meanwhile, on a seeded schedule:

- every 3-5 s a worker is SIGKILLed (its whole process group) and started again under the same
  node name (time-based, until every task was published and fetched);
- at fixed fractions of the tasks finished: ``CLIENT KILL`` of every worker connection (3x), a
  SIGKILL + restart of Redis (2x; the AOF brings the data back), and a partition of the solo
  worker (its proxy stops accepting and forwarding for ``PARTITION_S``, then heals).

Every start and finish is recorded by the task itself outside the broker (``bench.tasks.chaos``:
a list on the benchmark's own server, which is never faulted), with the worker's process group,
so effects are counted, not ids: lost = never finished, duplicate completion = finished more
than once, duplicate start = started more than once; recovery = SIGKILL -> the first new start
of a task the killed incarnation had started and not finished.

A run ends when every task finished and the broker holds nothing (no ready, reserved or
unacked message: a finished task whose ack was lost would still run again), or after
``chaos_drain`` seconds without faults. kombu's redis transport puts a dead worker's messages
back only at a worker's start-up or in its sweep (every ~100 s), and only once they are older
than ``visibility_timeout``; so that a run does not wait for the sweep, when nothing finished
for ``STALL_S`` and the last kill is older than the visibility timeout, the (idle) workers are
restarted once more: exactly what the sweep would do, sooner.

:func:`single` is the issue's single-worker figure: one worker, N tasks published up front, 8
SIGKILLs at evenly spaced progress, re-run finished tasks per kill. :func:`memory` measures
Redis memory per waiting message.
"""

from __future__ import annotations

import contextlib
import logging
import random
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from celery_msg.api import queue_counts
from celery_msg.testing import ServerProcess

from .common import KOMBU, OURS, Bench, new_prefix
from .proxy import TcpProxy
from .tasks import make_app
from .worker import Worker

logger = logging.getLogger(__name__)

QUEUE = "celery"
#: Memory: task indexes start here, so every message has the same length (< 900,000 of them).
INDEX_BASE = 100_000
#: Per transport, as the issue measured it: our lease, kombu's visibility timeout (seconds).
LEASE_S = 5.0
VISIBILITY_S = 30.0
TRANSPORT_OPTIONS: dict[str, dict[str, Any]] = {
    OURS: {"lease_timeout": LEASE_S},
    KOMBU: {"visibility_timeout": VISIBILITY_S},
}
#: The two workers of a chaos run: role -> (pool, concurrency).
ROLES: dict[str, tuple[str, int | None]] = {"prefork": ("prefork", 2), "solo": ("solo", None)}
#: Seconds between worker SIGKILLs (uniform), and how long the partition lasts.
KILL_EVERY = (3.0, 5.0)
PARTITION_S = 6.0
PARTITIONED_ROLE = "solo"
#: Redis is down this long between its SIGKILL and its restart.
REDIS_DOWN_S = 1.0
#: (fraction of tasks finished, fault) for the faults that are not kills.
PROGRESS_FAULTS: tuple[tuple[float, str], ...] = (
    (0.15, "client_kill"),
    (0.30, "redis_restart"),
    (0.45, "client_kill"),
    (0.55, "partition"),
    (0.70, "redis_restart"),
    (0.85, "client_kill"),
)
#: No task finished for this long -> the drain may restart idle workers (see module doc).
STALL_S = 5.0
#: A publish that keeps raising for this long is given up (and reported).
PUBLISH_GIVE_UP_S = 120.0
#: Slowest overall rate a run may have before it is cut off (tasks/s), as in celery_e2e.
MIN_RATE = 20
#: Single-worker runs: (pool, concurrency) per metric suffix.
SINGLE_POOLS: dict[str, tuple[str, int | None]] = {
    "solo": ("solo", None),
    "prefork": ("prefork", 2),
    "threads": ("threads", 2),
}


class ChaosError(RuntimeError):
    """The harness itself could not run (a worker never became ready, Redis did not restart)."""


@dataclass
class Kill:
    """One SIGKILL of a worker incarnation, identified by its process group."""

    at: float
    role: str
    pgid: int


@dataclass(frozen=True)
class Fault:
    """One fault as the harness did it, at an absolute time (``time.time()``).

    ``kind``: kill (a counted SIGKILL), stall_restart (an uncounted one at the drain),
    client_kill, redis_restart, partition, heal; ``role`` and ``pgid`` name the worker
    incarnation it hit (kills), or the role (partition, heal)."""

    at: float
    kind: str
    role: str = ""
    pgid: int = 0


@dataclass(frozen=True)
class Run:
    """One execution of one task: where it started, and when it finished (None: never)."""

    start: float
    pgid: int
    pid: int
    finish: float | None


#: Duplicate causes, in the order the attribution tries them (see :func:`attribute`).
CAUSES = (
    "kill",
    "partition",
    "redis_restart",
    "client_kill",
    "stall_restart",
    "publish_retry",
    "unexplained",
)


@dataclass
class Events:
    """Starts and finishes per task index, as (time, process group) pairs."""

    starts: dict[int, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    finishes: dict[int, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))

    #: The same, with the pid of the process that ran it: index -> [(time, pgid, pid)].
    starts_by_pid: dict[int, list[tuple[float, int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    finishes_by_pid: dict[int, list[tuple[float, int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def last_finish(self) -> float:
        return max((t for runs in self.finishes.values() for t, _ in runs), default=0.0)

    def runs(self, index: int) -> list[Run]:
        """The executions of task ``index`` in start order, each start paired with the first
        later finish of the same process."""
        finishes = sorted(self.finishes_by_pid.get(index, []))
        runs: list[Run] = []
        for start, pgid, pid in sorted(self.starts_by_pid.get(index, [])):
            finish = next(
                (f for f in finishes if f[1] == pgid and f[2] == pid and f[0] >= start), None
            )
            if finish is not None:
                finishes.remove(finish)
            runs.append(Run(start, pgid, pid, None if finish is None else finish[0]))
        return runs

    @classmethod
    def parse(cls, raw: list[Any]) -> Events:
        events = cls()
        for line in raw:
            kind, index, pgid, pid, at = bytes(line).decode().split()
            target = events.starts if kind == "S" else events.finishes
            target[int(index)].append((float(at), int(pgid)))
            by_pid = events.starts_by_pid if kind == "S" else events.finishes_by_pid
            by_pid[int(index)].append((float(at), int(pgid), int(pid)))
        return events


#: A killed worker counts as *busy* (holding work) when its incarnation recorded a start or a
#: finish this long before the kill, or had started a task it had not finished (see
#: :func:`busy_kills`). With 3 ms tasks and a backlog, a working worker records one every few
#: ms; an idle one (kombu's at the end of a run, waiting for its visibility timeout) none.
BUSY_WINDOW_S = 1.0


def busy_kills(events: Events, kills: list[Kill]) -> int:
    """How many ``kills`` hit a busy incarnation (:data:`BUSY_WINDOW_S`), from the recorded
    effects only. The per-kill figure divided by these is not diluted by kills of idle
    workers, which hold nothing and so can re-run nothing."""
    times: dict[int, list[float]] = defaultdict(list)
    open_starts: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for index, starts in events.starts_by_pid.items():
        finishes = events.finishes_by_pid.get(index, [])
        for at, pgid, pid in starts:
            times[pgid].append(at)
            done = min(
                (f for f, fpg, fpid in finishes if fpg == pgid and fpid == pid and f >= at),
                default=float("inf"),
            )
            open_starts[pgid].append((at, done))
        for at, pgid, _ in finishes:
            times[pgid].append(at)
    busy = 0
    for kill in kills:
        recent = any(kill.at - BUSY_WINDOW_S <= t <= kill.at for t in times.get(kill.pgid, []))
        running = any(at <= kill.at < done for at, done in open_starts.get(kill.pgid, []))
        busy += recent or running
    return busy


def analyse(events: Events, n: int, kills: list[Kill]) -> dict[str, Any]:
    """Lost, duplicates and recovery times from the recorded effects (see module doc)."""
    lost = sum(1 for i in range(n) if not events.finishes.get(i))
    never_started = sum(1 for i in range(n) if not events.starts.get(i))
    dup_completions = sum(max(0, len(f) - 1) for f in events.finishes.values())
    dup_starts = sum(max(0, len(s) - 1) for s in events.starts.values())
    recoveries: list[float] = []
    unrecovered = 0
    for kill in kills:
        # Tasks the killed incarnation held: its start is the last one before the kill, and
        # either it never finished there (it was running) or it starts again (finished but
        # not yet acked). Prefetched tasks it never started are invisible from outside.
        again: list[float] = []
        stranded = 0
        for i, starts in events.starts.items():
            before = [(t, pg) for t, pg in starts if t <= kill.at]
            if not before or max(before)[1] != kill.pgid:
                continue
            after = [t for t, _ in starts if t > kill.at]
            if after:
                again.append(min(after))
            elif not any(pg == kill.pgid for _, pg in events.finishes.get(i, [])):
                stranded += 1
        if again:
            recoveries.append(min(again) - kill.at)
        elif stranded:
            unrecovered += 1
    return {
        "lost": lost,
        "lost_never_started": never_started,
        "dup_completions": dup_completions,
        "dup_starts": dup_starts,
        "kills": len(kills),
        "dup_per_kill": dup_completions / len(kills) if kills else 0.0,
        "recovery_s": statistics.median(recoveries) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
        "recoveries_s": [round(r, 2) for r in recoveries],
        "kills_busy": (busy := busy_kills(events, kills)),
        "dup_per_busy_kill": dup_completions / busy if busy else 0.0,
        "kills_holding_tasks": len(recoveries) + unrecovered,
        "kills_never_recovered": unrecovered,
    }


#: A message may have been reserved (and so be held) this long before its recorded start: the
#: window before a run in which a Redis restart or a connection kill can have cost its lease.
HELD_BEFORE_START_S = LEASE_S


def attribute(
    events: Events,
    faults: list[Fault],
    roles: dict[int, str],
    t0: float = 0.0,
    republished: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Each duplicate start and duplicate completion, attributed to the fault that caused it.

    For every run of a task but its first, the run before it (``prev``) and the fault:

    - ``kill``: ``prev``'s worker incarnation was SIGKILLed between ``prev``'s start and this
      run's start (it was running, or had finished and its ack had not landed);
      ``stall_restart`` the same for the drain's uncounted restart;
    - ``partition``: one of the two runs was on the partitioned role, and the partition
      overlaps [``prev`` start - ``HELD_BEFORE_START_S``, this start];
    - ``redis_restart`` / ``client_kill``: one happened in that window (the first of the two
      when both did; a Redis restart also kills every connection);
    - ``publish_retry``: none of these, and the task was published again after a publish
      raised (the first publish may have landed: two messages of one task);
    - ``unexplained``: none of these.

    A duplicate completion is a finished run other than the first finished one; it takes the
    cause of its own start. Returns counts per cause, and the first duplicates in detail.
    """
    kills = [f for f in faults if f.kind in ("kill", "stall_restart")]
    partitions: list[tuple[float, float, str]] = []
    for fault in faults:
        if fault.kind == "partition":
            heals = [h.at for h in faults if h.kind == "heal" and h.role == fault.role]
            heal = min((at for at in heals if at >= fault.at), default=float("inf"))
            partitions.append((fault.at, heal, fault.role))
    others = [f for f in faults if f.kind in ("redis_restart", "client_kill")]

    def cause(index: int, prev: Run, cur: Run) -> str:
        for kill in kills:
            if kill.pgid == prev.pgid and prev.start <= kill.at <= cur.start:
                return kill.kind
        since = prev.start - HELD_BEFORE_START_S
        involved = {roles.get(prev.pgid), roles.get(cur.pgid)}
        for begin, heal, role in partitions:
            if role in involved and begin <= cur.start and heal >= since:
                return "partition"
        for fault in others:
            if since <= fault.at <= cur.start:
                return fault.kind
        return "publish_retry" if index in republished else "unexplained"

    starts = dict.fromkeys(CAUSES, 0)
    completions = dict.fromkeys(CAUSES, 0)
    detail: list[dict[str, Any]] = []
    for index in sorted(events.starts_by_pid):
        runs = events.runs(index)
        labels = ["first"] + [cause(index, runs[k - 1], runs[k]) for k in range(1, len(runs))]
        for label in labels[1:]:
            starts[label] += 1
        finished = [k for k, run in enumerate(runs) if run.finish is not None]
        for k in finished[1:]:
            completions[labels[k]] += 1
        if len(runs) > 1 and len(detail) < 60:
            detail.append(
                {
                    "task": index,
                    "runs": [
                        (
                            roles.get(run.pgid, "?"),
                            run.pgid,
                            round(run.start - t0, 2),
                            None if run.finish is None else round(run.finish - t0, 2),
                            label,
                        )
                        for run, label in zip(runs, labels, strict=True)
                    ],
                }
            )
    return {"dup_starts_by_cause": starts, "dup_completions_by_cause": completions, "dups": detail}


class Publisher(threading.Thread):
    """Publishes task ``i`` for i in 0..n-1, at most ``backlog`` ahead of the finished count.

    A publish that raises (Celery's retry policy exhausted: Redis down, connection killed) is
    retried with the same task id until it returns or ``PUBLISH_GIVE_UP_S`` passed.
    """

    def __init__(
        self,
        app: Celery,
        n: int,
        task_seconds: float,
        backlog: int,
        finished: Callable[[], int],
        id_prefix: str,
    ) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        self.app = app
        self.n = n
        self.task_seconds = task_seconds
        self.backlog = backlog
        self.finished = finished
        self.id_prefix = id_prefix
        self.stop = threading.Event()
        self.published = 0
        self.retried = 0
        #: Indexes published again after a publish raised (it may have landed).
        self.republished: set[int] = set()
        self.given_up: list[int] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            task = self.app.tasks["bench.chaos"]
            done = 0
            for index in range(self.n):
                while index - done >= self.backlog and not self.stop.is_set():
                    with contextlib.suppress(redis.RedisError):
                        done = self.finished()
                    if index - done >= self.backlog:
                        time.sleep(0.02)
                if self.stop.is_set():
                    return
                self._publish(task, index)
        except BaseException as exc:  # reported by the harness, never swallowed
            self.error = exc
        finally:
            self.ended_at = time.time()

    def _publish(self, task: Any, index: int) -> None:
        task_id = f"{self.id_prefix}-{index}"
        deadline = time.monotonic() + PUBLISH_GIVE_UP_S
        while not self.stop.is_set():
            try:
                task.apply_async((index, self.task_seconds), task_id=task_id)
                self.published += 1
                return
            except Exception as exc:
                self.retried += 1
                self.republished.add(index)
                logger.info("chaos: publish of %s raised %r; retrying", task_id, exc)
                if time.monotonic() >= deadline:
                    self.given_up.append(index)
                    return
                time.sleep(0.2)


class Cluster:
    """The faulted broker, a proxy per worker role, the workers, and what was done to them."""

    def __init__(
        self,
        bench: Bench,
        transport: str,
        roles: dict[str, tuple[str, int | None]],
        *,
        proxied: bool,
        label: str,
    ) -> None:
        self.bench = bench
        self.transport = transport
        self.roles = roles
        self.proxied = proxied
        self.prefix = new_prefix(label)
        self.options = TRANSPORT_OPTIONS[transport]
        self.server = ServerProcess(bench.server.kind, appendonly=True, appendfsync="always")
        self.proxies: dict[str, TcpProxy] = {}
        self.workers: dict[str, Worker] = {}
        self.kills: list[Kill] = []
        #: Every fault at its absolute time, and the role of every worker incarnation (pgid).
        self.timeline: list[Fault] = []
        self.incarnations: dict[int, str] = {}
        self.crashes: list[dict[str, Any]] = []
        self.faults: list[tuple[float, str, str]] = []
        self.stall_restarts = 0
        self.app: Celery | None = None
        self._admin: redis.Redis | None = None
        self.t0 = time.time()

    # -- set-up and tear-down --------------------------------------------------------------

    def start(self) -> Cluster:
        self.server.start()
        self._admin = self.server.client(socket_timeout=5.0, socket_connect_timeout=1.0)
        url = f"{self.transport}://127.0.0.1:{self.server.port}/0"
        self.app = make_app(url, self.options)
        for role in self.roles:
            if self.proxied:
                self.proxies[role] = TcpProxy(self.server.port, name=f"proxy-{role}").start()
            self._start_worker(role)
        return self

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        for proxy in self.proxies.values():
            proxy.close()
        if self.app is not None:
            self.app.close()
        if self._admin is not None:
            self._admin.close()
        self.server.close()

    def worker_url(self, role: str) -> str:
        port = self.proxies[role].port if role in self.proxies else self.server.port
        return f"{self.transport}://127.0.0.1:{port}/0"

    def _start_worker(self, role: str) -> Worker:
        pool, concurrency = self.roles[role]
        worker = Worker(
            self.bench,
            self.transport,
            self.prefix,
            pool=pool,
            concurrency=concurrency,
            transport_options=self.options,
            name=f"chaos-{role}",
            broker_url=self.worker_url(role),
        )
        self.workers[role] = worker.start()
        self.incarnations[worker.pid] = role
        return worker

    # -- what the run reads ----------------------------------------------------------------

    def now(self) -> float:
        return time.time() - self.t0

    def finished(self) -> int:
        return int(self.bench.client.scard(f"{self.prefix}:finished"))

    def pending(self) -> int | None:
        """Messages the broker still holds (ready, reserved/unacked, scheduled); None if down."""
        try:
            if self.transport == OURS:
                assert self.app is not None
                counts = queue_counts(self.app).get(QUEUE, {})
                return (
                    counts.get("ready", 0) + counts.get("reserved", 0) + counts.get("scheduled", 0)
                )
            assert self._admin is not None
            return int(self._admin.llen(QUEUE)) + int(self._admin.hlen("unacked"))
        except Exception:  # Redis restarting: not done yet
            return None

    def ready(self) -> int | None:
        """Messages waiting to be fetched (ready or scheduled); None while Redis is down."""
        try:
            if self.transport == OURS:
                assert self.app is not None
                counts = queue_counts(self.app).get(QUEUE, {})
                return counts.get("ready", 0) + counts.get("scheduled", 0)
            assert self._admin is not None
            return int(self._admin.llen(QUEUE))
        except Exception:
            return None

    def dead(self) -> int:
        if self.transport != OURS or self.app is None:
            return 0
        with contextlib.suppress(Exception):
            return queue_counts(self.app).get(QUEUE, {}).get("dead", 0)
        return 0

    def events(self) -> Events:
        return Events.parse(self.bench.client.lrange(f"{self.prefix}:events", 0, -1))

    # -- faults ----------------------------------------------------------------------------

    def kill(self, role: str, *, count: bool = True) -> None:
        """SIGKILL the role's worker (process group) and start it again, same node name."""
        worker = self.workers[role]
        worker.kill()
        at = time.time()
        self.timeline.append(Fault(at, "kill" if count else "stall_restart", role, worker.pid))
        if count:
            self.kills.append(Kill(at, role, worker.pid))
            self.faults.append((at - self.t0, "kill", role))
        worker.close()
        self._start_worker(role)

    def reap(self) -> None:
        """Start again any worker that exited on its own (and record that it did)."""
        for role, worker in list(self.workers.items()):
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                self.crashes.append(
                    {
                        "at": self.now(),
                        "role": role,
                        "code": proc.returncode,
                        "log": worker.log_tail(15),
                    }
                )
                logger.warning("chaos: %s worker exited with %s", role, proc.returncode)
                worker.close()
                self._start_worker(role)

    def client_kill(self) -> None:
        """CLIENT KILL every connection of every worker (their proxies' upstream ends)."""
        assert self._admin is not None
        self.faults.append((self.now(), "client_kill", ""))
        self.timeline.append(Fault(time.time(), "client_kill"))
        for proxy in self.proxies.values():
            for address in proxy.upstream_addresses():
                with contextlib.suppress(redis.RedisError):
                    self._admin.client_kill(address)

    def redis_restart(self) -> None:
        """SIGKILL Redis, wait, start it again on the same port from its AOF."""
        self.faults.append((self.now(), "redis_restart", ""))
        self.timeline.append(Fault(time.time(), "redis_restart"))
        self.server.kill()
        time.sleep(REDIS_DOWN_S)
        try:
            self.server.restart(timeout=60.0)
        except Exception as exc:
            raise ChaosError(f"redis did not come back: {exc}") from exc

    def partition(self, role: str) -> None:
        self.faults.append((self.now(), "partition", role))
        self.timeline.append(Fault(time.time(), "partition", role))
        self.proxies[role].partition()

    def heal(self, role: str) -> None:
        self.faults.append((self.now(), "heal", role))
        self.timeline.append(Fault(time.time(), "heal", role))
        self.proxies[role].heal()

    def restart_idle(self) -> None:
        """Restart every worker without counting a kill (drain only; see the module doc)."""
        self.stall_restarts += 1
        self.faults.append((self.now(), "stall_restart", ""))
        for role in list(self.workers):
            self.kill(role, count=False)


class Drain:
    """When a run is over, and the restart of idle workers at its end (see the module doc)."""

    def __init__(self, cluster: Cluster, n: int) -> None:
        self.cluster = cluster
        self.n = n
        self.finished = -1
        self.progress_at = time.time()
        self.restart_at = 0.0

    def observe(self, finished: int) -> None:
        if finished != self.finished:
            self.finished, self.progress_at = finished, time.time()

    @property
    def stalled(self) -> bool:
        return time.time() - self.progress_at >= STALL_S

    def over(self, publisher_done: bool) -> bool:
        """All published, and the broker holds nothing; and all finished or nothing moves.

        A task missing while the broker holds nothing and nothing finishes is lost for good
        (nothing can bring it back), so the run need not wait for the cap.
        """
        if not publisher_done or (self.finished < self.n and not self.stalled):
            return False
        return self.cluster.pending() == 0

    def step(self) -> None:
        """Nothing finished for STALL_S and the last kill is older than the timeout: the idle
        workers are restarted, so kombu restores expired unacked messages now, not at its
        next sweep."""
        last_kill = max([k.at for k in self.cluster.kills] + [self.restart_at])
        timeout = VISIBILITY_S if self.cluster.transport == KOMBU else LEASE_S
        if self.stalled and time.time() - last_kill >= timeout + 1:
            self.cluster.restart_idle()
            self.restart_at = time.time()


def run(bench: Bench, transport: str, seed: int) -> dict[str, Any]:
    """One chaos measurement of ``transport``; the fault schedule comes from ``seed``."""
    s = bench.settings
    n = s.chaos_n
    rng = random.Random(seed)
    cluster = Cluster(bench, transport, ROLES, proxied=True, label="chaos")
    publisher: Publisher | None = None
    try:
        cluster.start()
        for worker in cluster.workers.values():
            worker.wait_ready(timeout=60)
        assert cluster.app is not None
        publisher = Publisher(
            cluster.app, n, s.chaos_task_s, s.chaos_backlog, cluster.finished, cluster.prefix
        )
        cluster.t0 = started = time.time()
        publisher.start()
        next_kill = rng.uniform(*KILL_EVERY)
        progress_faults = list(PROGRESS_FAULTS)
        heal_at: float | None = None
        faults_over_at: float | None = None
        drain = Drain(cluster, n)
        cap = n / MIN_RATE + s.chaos_drain
        cut_off = False
        while True:
            now = cluster.now()
            finished = cluster.finished()
            drain.observe(finished)
            publisher_done = not publisher.is_alive()
            if publisher.error is not None:
                raise ChaosError(f"publisher failed: {publisher.error!r}")
            if drain.over(publisher_done):
                break
            if now > cap:
                logger.warning("chaos: %s run cut off after %.0f s", transport, now)
                cut_off = True
                break
            if heal_at is not None and now >= heal_at:
                cluster.heal(PARTITIONED_ROLE)
                heal_at = None
            # Everything published and fetched: what is left is running or held; faults end.
            if faults_over_at is None and publisher_done and finished < n and cluster.ready() == 0:
                faults_over_at = now
                cap = min(cap, now + s.chaos_drain)
            if faults_over_at is None and finished < n:
                if now >= next_kill:
                    cluster.kill(rng.choice(sorted(cluster.roles)))
                    next_kill = now + rng.uniform(*KILL_EVERY)
                while progress_faults and finished >= progress_faults[0][0] * n:
                    _, kind = progress_faults.pop(0)
                    if kind == "client_kill":
                        cluster.client_kill()
                    elif kind == "redis_restart":
                        cluster.redis_restart()
                    elif kind == "partition" and heal_at is None:
                        cluster.partition(PARTITIONED_ROLE)
                        heal_at = cluster.now() + PARTITION_S
            else:
                if faults_over_at is None:
                    faults_over_at = now
                    cap = min(cap, now + s.chaos_drain)
                if heal_at is None:
                    drain.step()
            cluster.reap()
            time.sleep(0.05)
        publisher.stop.set()
        publisher.join(timeout=10)
        events = cluster.events()
        out = analyse(events, n, cluster.kills)
        out.update(
            attribute(
                events,
                cluster.timeline,
                cluster.incarnations,
                started,
                frozenset(publisher.republished),
            )
        )
        out.update(
            wall_s=events.last_finish() - started,
            cut_off=cut_off,
            seed=seed,
            published=publisher.published,
            publish_retries=publisher.retried,
            publish_given_up=len(publisher.given_up),
            dead=cluster.dead(),
            left_in_broker=cluster.pending(),
            crashes=cluster.crashes,
            stall_restarts=cluster.stall_restarts,
            faults=[(round(t, 2), kind, role) for t, kind, role in cluster.faults],
        )
        return out
    finally:
        if publisher is not None:
            publisher.stop.set()
        cluster.close()


def single(bench: Bench, transport: str, pool: str, concurrency: int | None) -> dict[str, Any]:
    """One worker, N tasks published up front, ``chaos_single_kills`` kills evenly spread over
    the progress (at 1/(k+1) .. k/(k+1) of them finished)."""
    s = bench.settings
    n, kills = s.chaos_single_n, s.chaos_single_kills
    cluster = Cluster(bench, transport, {pool: (pool, concurrency)}, proxied=False, label="single")
    try:
        cluster.start()
        assert cluster.app is not None
        task = cluster.app.tasks["bench.chaos"]
        for index in range(n):
            task.apply_async((index, s.chaos_task_s), task_id=f"{cluster.prefix}-{index}")
        cluster.workers[pool].wait_ready(timeout=60)
        cluster.t0 = started = time.time()
        thresholds = [n * k // (kills + 1) for k in range(1, kills + 1)]
        drain = Drain(cluster, n)
        cap = n / MIN_RATE + s.chaos_drain
        cut_off = False
        while not (cut_off := cluster.now() >= cap):
            finished = cluster.finished()
            drain.observe(finished)
            if thresholds and finished >= thresholds[0]:
                thresholds.pop(0)
                cluster.kill(pool)
            elif not thresholds:
                if drain.over(publisher_done=True):
                    break
                drain.step()
            cluster.reap()
            time.sleep(0.02)
        events = cluster.events()
        out = analyse(events, n, cluster.kills)
        out.update(
            wall_s=events.last_finish() - started,
            cut_off=cut_off,
            left_in_broker=cluster.pending(),
            crashes=cluster.crashes,
            stall_restarts=cluster.stall_restarts,
        )
        return out
    finally:
        cluster.close()


def memory(bench: Bench, transport: str, n: int, size: int) -> dict[str, Any]:
    """Redis memory of ``n`` waiting Celery task messages, each ``size`` B as kombu stores it.

    The message is a ``bench.chaos`` task whose argument is padded (and task id sized) until
    kombu's redis transport stores it (its JSON envelope, as one list element) in ``size``
    bytes; the same task, every one of the same length, is published to both transports.
    Returns the growth of ``used_memory`` per message and ``MEMORY USAGE`` (all samples) of
    every key.
    """
    bench.flush()
    pad, id_length, stored = _pad_for(bench, size)
    bench.flush()
    client = redis.Redis.from_url(f"redis://127.0.0.1:{bench.server.port}/0")
    app = make_app(bench.broker_url(transport), TRANSPORT_OPTIONS[transport])
    try:
        task = app.tasks["bench.chaos"]
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        for index in range(n):
            task.apply_async((INDEX_BASE + index, pad), task_id=f"{index:0{id_length}d}")
        publish_s = time.perf_counter() - started
        after = int(client.info("memory")["used_memory"])
        keys: dict[str, int] = {}
        for key in client.scan_iter(count=1000):
            usage = client.memory_usage(key, samples=0) or 0
            keys[key.decode(errors="replace")] = int(usage)
    finally:
        app.close()
        client.close()
        bench.flush()
    return {
        "n": n,
        "message_bytes": stored,
        "pad": len(pad),
        "per_message_b": (after - before) / n,
        "used_memory_mb": (after - before) / 1e6,
        "keys_mb": {k: v / 1e6 for k, v in sorted(keys.items(), key=lambda kv: -kv[1])},
        "publish_per_s": n / publish_s,
    }


def _pad_for(bench: Bench, size: int) -> tuple[str, int, int]:
    """A padding argument and a task-id length with which kombu stores a ``bench.chaos``
    task in ``size`` bytes (or the nearest it gets), and the size it stores.

    A padding character costs about 7/3 B (in the base64 body and in the ``argsrepr``
    header), a task-id character 2-3 B (``id``, ``correlation_id``, ``root_id``); a few
    combinations near the estimate are tried.
    """
    client = redis.Redis.from_url(f"redis://127.0.0.1:{bench.server.port}/0")
    app = make_app(bench.broker_url(KOMBU))
    task = app.tasks["bench.chaos"]

    def stored(pad: int, id_length: int) -> int:
        client.delete(QUEUE)
        task.apply_async((INDEX_BASE, "x" * pad), task_id="0" * id_length)
        return len(client.lindex(QUEUE, 0) or b"")

    best: tuple[int, int, int, int] | None = None  # (distance, pad, id length, stored)
    try:
        for id_length in range(36, 15, -1):
            base = stored(0, id_length)
            if base > size:
                continue
            guess = (size - base) * 3 // 7
            for pad in range(max(0, guess - 4), guess + 5):
                got = stored(pad, id_length)
                if best is None or abs(got - size) < best[0]:
                    best = (abs(got - size), pad, id_length, got)
                if got == size:
                    return "x" * pad, id_length, got
    finally:
        client.delete(QUEUE)
        app.close()
        client.close()
    if best is None:
        raise ChaosError(f"no bench.chaos message is as small as {size} B")
    return "x" * best[1], best[2], best[3]
