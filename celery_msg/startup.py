"""Checks that make a misconfiguration loud: at :func:`celery_msg.configure` and at worker start.

Forgetting ``configure(app)`` while policies are set would ack a failing task away (no retry,
no dead letter, no log): the very loss celery-msg exists to prevent. So a worker whose app has
policies but not our consumer refuses to start, naming the fix, and one that uses
``celery-msg://`` without ``configure()`` says so. A URL close to ours (``celery_msg://``,
``celerymsg://``) fails with "did you mean" instead of kombu's ``No such transport: ''``.

The worker checks are Celery signal handlers, connected when :mod:`celery_msg` is imported (by
:mod:`celery_msg.registration`, as soon as Celery is); the ``celery`` command imports it for every
sub-command (our ``celery.commands`` entry point), so they run even when the app module never
imports :mod:`celery_msg`.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from celery import Celery
from kombu.utils.imports import symbol_by_name

from .errors import ConfigurationError
from .policy import Policies, policies_from
from .registration import SCHEMES, URL_SCHEMES

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.\-_]*)://")
#: What people type for ours: the package name, no dash, a ``+redis`` suffix.
_NORMALISE = re.compile(r"[^a-z]")


class PolicyNotAppliedWarning(UserWarning):
    """Policies are set where they cannot act (``task_always_eager``)."""


def broker_scheme(url: object) -> str | None:
    """The scheme of a broker URL (``celery-msg``), or None when there is none."""
    match = _SCHEME.match(str(url or ""))
    return match.group(1).lower() if match else None


def suggest_scheme(scheme: str | None) -> str | None:
    """Our scheme when ``scheme`` looks like a typo of it, else None (``redis`` is not one)."""
    if scheme is None or scheme in URL_SCHEMES:
        return None
    squashed = _NORMALISE.sub("", scheme.split("+", 1)[0])
    tls = squashed.endswith("msgs") or scheme.startswith("celery-msgs")
    if squashed in ("celerymsg", "celerymsgs") or scheme.startswith("celery-msg"):
        return "celery-msgs" if tls else "celery-msg"
    close = difflib.get_close_matches(scheme, SCHEMES, n=1, cutoff=0.8)
    return close[0] if close else None


def check_broker_url(url: object) -> None:
    """Raise :class:`ConfigurationError` for a broker URL that is a typo of ``celery-msg://``."""
    scheme = broker_scheme(url)
    suggestion = suggest_scheme(scheme)
    if suggestion is not None:
        raise ConfigurationError(
            f"broker_url scheme '{scheme}://' is not a transport: did you mean {suggestion}:// ?"
        )


def uses_celery_msg(app: Celery) -> bool:
    return broker_scheme(app.conf.broker_url) in URL_SCHEMES


def has_policies(app: Celery) -> bool:
    """True when the app's configuration sets policies (``msg_policies`` /
    ``CELERY_MSG_POLICIES``), whether or not :func:`configure` installed them."""
    value = app.conf.get("msg_policies")
    return value is not None and value != Policies()


def check_configure(app: Celery, policies: Policies) -> None:
    """What :func:`celery_msg.configure` refuses or warns about before changing ``app``."""
    check_broker_url(app.conf.broker_url)
    if policies != Policies() and not uses_celery_msg(app):
        raise ConfigurationError(
            f"policies need a celery-msg:// broker; broker_url is "
            f"{_redacted(app.conf.broker_url)!r} (its transport would ignore them)"
        )
    if policies != Policies() and app.conf.task_always_eager:
        warnings.warn(
            "task_always_eager: eager tasks run in the caller without a broker, so celery-msg "
            "policies (ack mode, retry, dead letters, unique) are not applied to them",
            PolicyNotAppliedWarning,
            stacklevel=3,
        )


def configured(app: Celery) -> bool:
    """Whether :func:`celery_msg.configure` installed our worker consumer in ``app``."""
    from .app import Consumer

    try:
        consumer = symbol_by_name(app.conf.worker_consumer)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(consumer, type) and issubclass(consumer, Consumer)


def refusal(app: Celery) -> str | None:
    """Why a worker of ``app`` must not start, or None."""
    try:
        check_broker_url(app.conf.broker_url)
    except ConfigurationError as exc:
        return str(exc)
    if has_policies(app) and not configured(app):
        return (
            "msg_policies (CELERY_MSG_POLICIES) is set but celery_msg.configure(app) was not "
            "called, so no policy would be applied: a failing task would be acked away, not "
            "retried or dead-lettered. Call celery_msg.configure(app) in the module that "
            "creates the app, after its configuration is loaded."
        )
    return None


def startup_warnings(app: Celery, queues: Iterable[str]) -> list[str]:
    """What a worker consuming ``queues`` should warn about at start."""
    found: list[str] = []
    if uses_celery_msg(app) and not configured(app):
        found.append(
            "this app uses celery-msg:// but never called celery_msg.configure(app): messages "
            "the worker cannot run are acked away instead of dead-lettered, and options are "
            "not checked"
        )
    if not configured(app):
        return found
    policies = policies_from((app.conf.broker_transport_options or {}).get("policies"))
    routed = _routed_queues(app)
    if routed is not None:  # None: a router function decides at run time
        for queue in sorted(set(policies.queues) - routed - set(queues)):
            found.append(
                f"policy for queue {queue!r}: no route, declared queue or -Q queue uses it"
            )
    names = [name for name in app.tasks if not name.startswith("celery.")]
    for pattern in sorted(policies.tasks):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            found.append(f"policy for task {pattern!r}: matches no task registered on this worker")
    if app.conf.task_always_eager and policies != Policies():
        found.append(
            "task_always_eager is set: eager tasks run in the caller, without these policies"
        )
    return found


def _routed_queues(app: Celery) -> set[str] | None:
    """Queue names the app's configuration sends tasks to (routes, task options, defaults);
    None when a router function or class decides at run time."""
    names = {str(app.conf.task_default_queue)}
    names |= {str(getattr(q, "name", q)) for q in (app.conf.task_queues or ())}
    for route in _routes(app.conf.task_routes):
        if isinstance(route, str):
            names.add(route)
            continue
        if not isinstance(route, Mapping):
            return None
        queue = route.get("queue")
        name = getattr(queue, "name", queue)
        if isinstance(name, str):
            names.add(name)
    for task in app.tasks.values():
        queue = getattr(task, "queue", None)
        if isinstance(queue, str):
            names.add(queue)
    return names


def _routes(routes: Any) -> list[Any]:
    if routes is None:
        return []
    if isinstance(routes, Mapping):
        return list(routes.values())
    if isinstance(routes, list | tuple):
        return [r for item in routes for r in _routes(item)]
    return [routes]  # a router: decides at run time


def _redacted(url: object) -> str:
    return re.sub(r"://([^@/]*)@", "://***@", str(url or ""))


def on_worker_init(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``celeryd_init``: refuse to start, before connecting, when the app would lose messages."""
    app = getattr(instance, "app", None)
    if app is None:
        return
    reason = refusal(app)
    if reason is not None:
        # Celery's signal dispatch logs and swallows Exceptions; SystemExit stops the worker.
        print(f"celery-msg: worker not started: {reason}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def on_worker_setup(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``celeryd_after_setup``: the queues are known (``-Q``), tasks registered, logging set."""
    app = getattr(instance, "app", None)
    if app is None:
        return
    queues = [str(q.name) for q in app.amqp.queues.consume_from.values()]
    for text in startup_warnings(app, queues):
        logger.warning("celery-msg: %s", text)
