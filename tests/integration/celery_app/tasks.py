"""The test app's tasks and :func:`create_app`, which builds the app from an env mapping.

Tasks that matter for delivery guarantees record ``start`` / ``finish`` events (task id, pid,
worker node, time) in a Redis list, so tests count executions instead of trusting results.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import celeryd_after_setup
from celery.worker.control import control_command
from kombu import Queue
from kombu.common import Broadcast
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

import celery_msg
import celery_msg.broadcast
import celery_msg.childack

from .errors import Fatal, Transient
from .policies import PROFILES
from .settings import DEFAULT_QUEUE, SECOND_QUEUE, Settings

_clients: dict[tuple[int, str], redis.Redis] = {}


def _events_client(settings: Settings) -> redis.Redis:
    # One client per process (prefork children must not share their parent's sockets); it
    # retries for ~10 s so that a task survives a Redis restart around it.
    key = (os.getpid(), settings.events_url)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = redis.Redis.from_url(
            settings.events_url,
            socket_timeout=5,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
    return client


def record(settings: Settings, event: str, **fields: Any) -> None:
    """Append one event to the settings' event list."""
    entry = {"event": event, "pid": os.getpid(), "time": time.time(), **fields}
    _events_client(settings).rpush(settings.events_key, json.dumps(entry))


def runs_key(settings: Settings) -> str:
    """Hash (database 0) of task id -> how many times the ``counted`` task ran with it."""
    return f"{settings.prefix}runs"


def runs_so_far(settings: Settings, task_id: str) -> int:
    """How many ``start`` events task ``task_id`` has recorded (its earlier executions)."""
    raw = _events_client(settings).lrange(settings.events_key, 0, -1)
    events = (json.loads(item) for item in raw)
    return sum(1 for e in events if e.get("event") == "start" and e.get("task") == task_id)


def create_app(environ: Mapping[str, str]) -> Celery:
    """The test app for the settings in ``environ`` (see :class:`Settings`)."""
    settings = Settings.from_environ(environ)
    app = Celery(
        "celery_app",
        broker=settings.broker_url,
        backend=settings.backend_url,
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=DEFAULT_QUEUE,
        task_routes={"routed": {"queue": SECOND_QUEUE}},
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        result_backend_transport_options={"global_keyprefix": settings.prefix},
        result_expires=600,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_lost_wait=settings.worker_lost_wait,
    )
    if settings.broadcast:
        app.conf.task_queues = (
            Queue(DEFAULT_QUEUE),
            Queue(SECOND_QUEUE),
            Broadcast(settings.broadcast),
        )
    policies = PROFILES[settings.policies] if settings.policies else None
    if settings.transport == "redis":
        # kombu's own redis transport, for comparing what operators see.
        app.conf.broker_transport_options = {"global_keyprefix": settings.prefix}
        if settings.configure:
            celery_msg.configure(app, policies=policies)
    else:
        options: dict[str, Any] = {
            "key_prefix": settings.prefix,
            "lease_timeout": settings.lease_timeout,
            "sweep_interval": settings.sweep_interval,
            "binding_ttl": settings.binding_ttl,
            "max_deliveries": settings.max_deliveries,
            "socket_timeout": 5.0,
        }
        if settings.master_name:
            options["master_name"] = settings.master_name
        if settings.broker_ca_file:
            app.conf.broker_use_ssl = {"ssl_ca_certs": settings.broker_ca_file}
            if settings.master_name:
                options["sentinel_kwargs"] = {"ssl": True, "ssl_ca_certs": settings.broker_ca_file}
        if settings.configure:
            celery_msg.configure(app, policies=policies, **options)
        else:
            if policies is not None:
                options["policies"] = policies
            app.conf.broker_transport_options = options
            _name_broadcast_queues_by_hand(app)
    _register_tasks(app, settings)
    return app


def _name_broadcast_queues_by_hand(app: Celery) -> None:
    """What the README tells an app without ``configure()`` to do for its Broadcast queues."""

    @celeryd_after_setup.connect(weak=False)
    def name_broadcast_queues(sender: str, instance: Any, **kwargs: Any) -> None:
        if instance.app is app:
            celery_msg.broadcast.name_broadcast_queues(instance.app.amqp.queues, sender)


def _describe(task: Task) -> dict[str, Any]:
    info = task.request.delivery_info or {}
    return {
        "hostname": task.request.hostname,
        "routing_key": info.get("routing_key"),
        "priority": info.get("priority"),
        "pid": os.getpid(),
    }


def _register_tasks(app: Celery, settings: Settings) -> None:
    @app.task(name="add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tsum", shared=False)
    def tsum(numbers: list[int]) -> int:
        return sum(numbers)

    @app.task(name="fail", shared=False)
    def fail(text: str) -> None:
        raise ValueError(text)

    @app.task(name="describe", shared=False, bind=True)
    def describe(self: Task) -> dict[str, Any]:
        return _describe(self)

    @app.task(name="routed", shared=False, bind=True)
    def routed(self: Task) -> dict[str, Any]:
        return _describe(self)

    @app.task(name="sleep_then_record", shared=False, bind=True, acks_late=True)
    def sleep_then_record(self: Task, seconds: float, label: str = "") -> str:
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        time.sleep(seconds)
        record(settings, "finish", **where)
        return label

    @app.task(name="sleep_acked_early", shared=False, bind=True, acks_late=False)
    def sleep_acked_early(self: Task, seconds: float, label: str = "") -> str:
        """As ``sleep_then_record``, but acked when it starts: its prefetch slot is free at
        once, so the consumer takes the next message and hands it to a pool that is busy."""
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        time.sleep(seconds)
        record(settings, "finish", **where)
        return label

    @app.task(name="counted", shared=False, bind=True)
    def counted(self: Task, x: int) -> int:
        """Counts its runs per task id in a hash beside the event list (outside the broker)."""
        _events_client(settings).hincrby(runs_key(settings), self.request.id, 1)
        return x

    @app.task(name="record_now", shared=False, bind=True)
    def record_now(self: Task, label: str = "") -> str:
        """Records a start and a finish at once; not acks_late (acked when it starts)."""
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        record(settings, "finish", **where)
        return label

    @app.task(name="held_now", shared=False, bind=True, acks_late=True)
    def held_now(self: Task, label: str = "") -> str:
        """Records, as ``<label>:<n>``, how many messages of its queue are leased while it
        runs (itself included: acked when it returns)."""
        queue = (self.request.delivery_info or {}).get("routing_key") or DEFAULT_QUEUE
        leased = _events_client(settings).zcard(f"{settings.prefix}{{{queue}}}:leased")
        record(settings, "start", task=self.request.id, label=f"{label}:{leased}")
        return label

    @app.task(name="die", shared=False, bind=True, acks_late=True)
    def die(self: Task) -> None:
        """Kills the process running it (with the solo pool: the whole worker)."""
        record(settings, "start", task=self.request.id, worker=self.request.hostname)
        os.kill(os.getpid(), signal.SIGKILL)

    # Tasks for policies: no ack attributes of their own, so the policy's ack mode decides.

    def fail_first_runs(task: Task, fail_times: int, label: str, recorded: str) -> int:
        """Fails (Transient) on the first ``fail_times`` runs of ``task``, then returns its run
        number; every run records ``recorded`` as its label."""
        run = runs_so_far(settings, task.request.id) + 1
        where = {"task": task.request.id, "label": recorded, "worker": task.request.hostname}
        record(settings, "start", token=str(run), **where)
        if run <= fail_times:
            record(settings, "fail", token=str(run), **where)
            raise Transient(f"run {run} of {label}")
        record(settings, "finish", token=str(run), **where)
        return run

    @app.task(name="attempt", shared=False, bind=True)
    def attempt(self: Task, fail_times: int, label: str = "") -> int:
        """Fails (Transient) on its first ``fail_times`` runs, then returns its run number."""
        return fail_first_runs(self, fail_times, label, label)

    @app.task(name="always_fail", shared=False, bind=True)
    def always_fail(self: Task, label: str = "") -> None:
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        record(settings, "fail", **where)
        raise Transient(f"always {label}")

    @app.task(name="fatal", shared=False, bind=True)
    def fatal(self: Task, label: str = "") -> None:
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        record(settings, "fail", **where)
        raise Fatal(f"fatal {label}")

    @app.task(
        name="autoretry",
        shared=False,
        bind=True,
        autoretry_for=(Transient,),
        retry_kwargs={"max_retries": 2, "countdown": 0.2},
    )
    def autoretry(self: Task, label: str = "") -> None:
        """Celery's own retries: 3 runs in all, whatever the retry policy says."""
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        record(settings, "fail", **where)
        raise Transient(f"autoretry {label}")

    @app.task(name="kill_once", shared=False, bind=True)
    def kill_once(self: Task, label: str = "") -> int:
        """Its first run SIGKILLs the process running it; a later run succeeds."""
        run = runs_so_far(settings, self.request.id) + 1
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", token=str(run), **where)
        if run == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        record(settings, "finish", token=str(run), **where)
        return run

    @app.task(name="kill_always", shared=False, bind=True)
    def kill_always(self: Task) -> None:
        record(settings, "start", task=self.request.id, worker=self.request.hostname)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(name="traced", shared=False, bind=True)
    def traced(self: Task, fail_times: int, label: str = "") -> int:
        """As ``attempt``, recording the W3C ``traceparent`` header the run sees as its label
        (read as OpenTelemetry's Celery instrumentation reads it: an attribute of the request)."""
        seen = str(getattr(self.request, "traceparent", None))
        return fail_first_runs(self, fail_times, label, seen)

    @app.task(name="stop_worker_then", shared=False, bind=True, acks_late=True)
    def stop_worker_then(self: Task, outcome: str, label: str = "") -> str:
        """Run in a prefork pool child only: SIGSTOPs the worker (this child's parent), so
        the worker never reads the result while stopped, then ends with ``outcome``:
        ``succeed``, ``fail`` (Fatal) or ``retry`` (``self.retry``, a minute later)."""
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", **where)
        os.kill(os.getppid(), signal.SIGSTOP)
        if outcome == "fail":
            raise Fatal(f"fatal {label}")
        if outcome == "retry":
            raise self.retry(countdown=60)
        record(settings, "finish", **where)
        return label

    @app.task(name="pool_child", shared=False, bind=True, acks_late=True)
    def pool_child(self: Task, label: str = "") -> bool:
        """Whether the process running it counts as a prefork pool child (which acks its own
        successes: celery_msg.childack); records a start."""
        record(settings, "start", task=self.request.id, label=label)
        return celery_msg.childack.in_pool_child()

    @app.task(name="record_eta", shared=False, bind=True)
    def record_eta(self: Task, label: str = "") -> str:
        """Records a start and a finish, with the task's ``eta`` (ISO 8601) as the token."""
        where = {"task": self.request.id, "label": label, "worker": self.request.hostname}
        record(settings, "start", token=str(self.request.eta or ""), **where)
        record(settings, "finish", **where)
        return label


@control_command(args=[("token", str)], signature="<token>")
def record_broadcast(state: Any, token: str) -> dict[str, str]:
    """A custom remote-control command: records that this node received ``token``."""
    settings = Settings.from_environ(os.environ)
    record(settings, "control", token=token, worker=state.consumer.hostname)
    return {"ok": token}


@control_command()
def unencodable_reply(state: Any) -> dict[str, object]:
    """A test-only command whose reply cannot be encoded: the worker's reply fails (Celery
    then resets its remote-control consumer). Records that it ran."""
    settings = Settings.from_environ(os.environ)
    record(settings, "control", token="unencodable", worker=state.consumer.hostname)
    return {"ok": object()}
