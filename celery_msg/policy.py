"""Ack, retry and dead-letter policies: declared once, per queue and per task, checked at start-up.

A :class:`Policy` leaves every field it does not set to the next layer down, so that a task
policy can change the retry schedule while its queue's dead-letter retention still applies:

    task policy  >  queue policy  >  default policy  >  built-in defaults

:meth:`Policies.resolve` folds the layers into one :class:`Resolved` policy with every field
set. Task names may be glob patterns (``"reports.*"``); an exact name wins over a pattern.

Why typed objects rather than dicts: a typo or an out-of-range number must fail when the worker
starts, naming the field (``policies.tasks['x'].retry.max_retries``), not when the first task
fails at 3 a.m.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, TypeAlias, get_args

from . import validate as check
from .errors import ConfigurationError

AckMode = Literal["early", "late", "on_success"]
Jitter = Literal["full", "equal"]

ACK_MODES: tuple[str, ...] = get_args(AckMode)


_RNG = random.Random()


class _Checked:
    """Validates a policy object when it is built; errors name the class and the field."""

    def __post_init__(self) -> None:
        try:
            self._check()
        except ConfigurationError as exc:
            raise ConfigurationError(f"{type(self).__name__}.{exc}") from None

    def _check(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Fixed(_Checked):
    """The same delay before every retry."""

    seconds: float = 10.0

    def _check(self) -> None:
        check.non_negative_number("seconds", self.seconds)

    def delay(self, retries: int, rng: random.Random) -> float:
        return float(self.seconds)


@dataclass(frozen=True)
class Exponential(_Checked):
    """``base * factor ** retries`` seconds, capped at ``cap``, with optional jitter.

    ``jitter="full"`` draws uniformly from ``[0, delay]`` and ``"equal"`` from
    ``[delay / 2, delay]``: both keep many clients that failed together from retrying together.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 600.0
    jitter: Jitter | None = "full"

    def _check(self) -> None:
        check.positive_number("base", self.base)
        check.non_negative_number("cap", self.cap)
        if not check.is_number(self.factor) or self.factor < 1:
            raise ConfigurationError(f"factor: must be a number >= 1, got {self.factor!r}")
        check.one_of("jitter", self.jitter, get_args(Jitter), optional=True)

    def ceiling(self, retries: int) -> float:
        """The delay before jitter: never more than ``cap``, never less for more retries."""
        # Compare exponents before computing the power: factor ** 10_000 overflows a float.
        if self.factor > 1 and retries * math.log(self.factor) > math.log(
            max(self.cap, 1e-9) / self.base
        ):
            return float(self.cap)
        return float(min(self.cap, self.base * self.factor**retries))

    def delay(self, retries: int, rng: random.Random) -> float:
        ceiling = self.ceiling(retries)
        if self.jitter == "full":
            return rng.uniform(0.0, ceiling)
        if self.jitter == "equal":
            return ceiling / 2 + rng.uniform(0.0, ceiling / 2)
        return ceiling


Backoff: TypeAlias = Fixed | Exponential | Callable[[int], float]


@dataclass(frozen=True)
class Retry(_Checked):
    """When and how a failed task is retried (its message waits in Redis meanwhile).

    ``retry_on``: exception types that are retried (default: any ``Exception``);
    ``give_up_on``: types that never are, even when they match ``retry_on``.
    ``backoff`` may be :class:`Fixed`, :class:`Exponential` or a callable taking the number of
    retries so far and returning seconds.
    """

    max_retries: int = 3
    backoff: Backoff = field(default_factory=Exponential)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()

    def _check(self) -> None:
        check.int_at_least("max_retries", self.max_retries, 0)
        if not isinstance(self.backoff, Fixed | Exponential) and not callable(self.backoff):
            raise ConfigurationError(
                f"backoff: must be Fixed, Exponential or a callable, got {self.backoff!r}"
            )
        for name in ("retry_on", "give_up_on"):
            value = getattr(self, name)
            if isinstance(value, type):
                value = (value,)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise ConfigurationError(
                    f"{name}: must be a tuple of exception types, got {value!r}"
                )

    def applies_to(self, exc: BaseException) -> bool:
        """Whether ``exc`` is retried at all (whatever the count)."""
        return isinstance(exc, self.retry_on) and not isinstance(exc, self.give_up_on)

    def countdown(self, retries: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retries + 1``."""
        backoff = self.backoff
        if isinstance(backoff, Fixed | Exponential):
            return backoff.delay(retries, rng or _RNG)
        seconds = backoff(retries)
        if not check.is_number(seconds) or seconds < 0:
            raise ConfigurationError(
                f"backoff callable returned {seconds!r} for {retries} retries; "
                "it must return seconds >= 0"
            )
        return float(seconds)


@dataclass(frozen=True)
class DeadLetter(_Checked):
    """What happens to a message that will not run again.

    ``enabled``: keep failed (retries exhausted), poison and expired messages in the queue's
    dead-letter store; when off they are acked and dropped (counted and logged). Messages that
    cannot be decoded are always kept: they are a bug to look at, not a failure to forget.
    ``max_length`` / ``max_age`` (seconds) bound the store; the oldest go first.
    ``expired``: dead-letter expired messages too (else they are only counted).
    """

    enabled: bool = True
    max_length: int | None = 10_000
    max_age: float | None = 7 * 24 * 3600.0
    expired: bool = True

    def _check(self) -> None:
        check.boolean("enabled", self.enabled)
        check.boolean("expired", self.expired)
        check.int_at_least("max_length", self.max_length, 1, optional=True)
        if self.max_age is not None:
            check.positive_number("max_age", self.max_age)


UniqueUntil = Literal["success", "start"]
UNIQUE_UNTIL: tuple[str, ...] = get_args(UniqueUntil)
#: The longest a unique lock lives by default (a day): a safety net for a message that is lost
#: to celery-msg's view (deleted by hand), never the window users rely on.
DEFAULT_UNIQUE_TTL = 86_400.0


@dataclass(frozen=True)
class Unique(_Checked):
    """Deduplicated publishing (as BullMQ's deduplication and Sidekiq's unique jobs): while a
    task id is *locked*, publishing it again stores nothing and returns the same id.

    ``until="success"`` (the default): locked from publish until the task succeeds (or fails
    for good, is dead-lettered, purged or expired), whatever the ack mode: with ``ack="early"``
    the message is acked before it runs, and a second publish meanwhile is still refused.
    ``until="start"``: until the worker starts the task (a newer request may then queue).
    ``until=None``: a pure time window of ``ttl`` seconds from the publish.
    ``ttl``: the most a lock lives in any case (seconds).
    """

    until: UniqueUntil | None = "success"
    ttl: float = DEFAULT_UNIQUE_TTL

    def _check(self) -> None:
        check.one_of("until", self.until, UNIQUE_UNTIL, optional=True)
        check.positive_number("ttl", self.ttl)


@dataclass(frozen=True)
class Policy(_Checked):
    """One layer of policy. ``None`` means: take it from the layer below.

    ``ack``: ``early`` (ack on receipt: at most once), ``late`` (ack when the task ends,
    success or failure: a process lost mid-task is not run again) or ``on_success`` (ack only
    on success: a lost process or a time limit redelivers, bounded by ``max_deliveries``).
    Unset, the task's own Celery settings (``acks_late`` ...) apply.
    ``max_deliveries``: deliveries without an ack after which the message is poison and goes
    to the dead-letter store instead of running again (0 = unlimited).
    ``unique``: deduplicated publishing by task id (:class:`Unique`; ``True`` means
    ``Unique()``: locked until the task succeeds).
    """

    ack: AckMode | None = None
    max_deliveries: int | None = None
    retry: Retry | None = None
    dead_letter: DeadLetter | None = None
    unique: bool | Unique | None = None

    def _check(self) -> None:
        check.one_of("ack", self.ack, ACK_MODES, optional=True)
        check.int_at_least("max_deliveries", self.max_deliveries, 0, optional=True)
        if self.retry is not None:
            check.instance_of("retry", self.retry, Retry, "a Retry")
        if self.dead_letter is not None:
            check.instance_of("dead_letter", self.dead_letter, DeadLetter, "a DeadLetter")
        if self.unique is not None:
            check.instance_of(
                "unique", self.unique, (bool, Unique), "True, False, a Unique or None"
            )

    def over(self, lower: Policy) -> Policy:
        """This layer on top of ``lower``: each field set here wins."""
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        return dataclasses.replace(lower, **changes)


@dataclass(frozen=True)
class Resolved:
    """The policy of one (task, queue) pair, every field set."""

    ack: AckMode | None
    max_deliveries: int
    retry: Retry | None
    dead_letter: DeadLetter
    unique: Unique | None


BUILTIN = Policy(ack=None, max_deliveries=0, retry=None, dead_letter=DeadLetter(), unique=False)


@dataclass(frozen=True)
class Policies:
    """Every policy of an app: a default, and overrides by queue name and by task name."""

    default: Policy = field(default_factory=Policy)
    queues: Mapping[str, Policy] = field(default_factory=dict)
    tasks: Mapping[str, Policy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.default, Policy):
            raise ConfigurationError(
                f"policies.default: must be a Policy, got {type(self.default).__name__}"
            )
        for name in ("queues", "tasks"):
            table = getattr(self, name)
            if not isinstance(table, Mapping):
                raise ConfigurationError(f"policies.{name}: must be a mapping of name -> Policy")
            for key, policy in table.items():
                if not isinstance(key, str) or not isinstance(policy, Policy):
                    raise ConfigurationError(
                        f"policies.{name}[{key!r}]: must be a Policy, got {type(policy).__name__}"
                    )
            object.__setattr__(self, name, dict(table))

    def __hash__(self) -> int:
        return id(self)

    def __json__(self) -> dict[str, Any]:
        """A JSON-safe description, for kombu's JSON encoder.

        ``configure()`` keeps the policies in ``broker_transport_options``, which Celery sends
        back in every ``inspect stats`` reply (and Flower reads): a reply that cannot be encoded
        is never answered, so the policies must always encode.
        """
        described = _describe(self)
        assert isinstance(described, dict)
        return described

    def resolve(self, task: str | None, queue: str | None) -> Resolved:
        """The policy for ``task`` (a Celery task name) consumed from ``queue``."""
        return _resolve(self, task, queue)

    def for_task(self, task: str | None) -> Policy | None:
        if task is None:
            return None
        exact = self.tasks.get(task)
        if exact is not None:
            return exact
        for pattern, policy in self.tasks.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(task, pattern):
                return policy
        return None


@lru_cache(maxsize=4096)
def _resolve(policies: Policies, task: str | None, queue: str | None) -> Resolved:
    layered = policies.default.over(BUILTIN)
    by_queue = policies.queues.get(queue) if queue is not None else None
    if by_queue is not None:
        layered = by_queue.over(layered)
    by_task = policies.for_task(task)
    if by_task is not None:
        layered = by_task.over(layered)
    assert layered.dead_letter is not None and layered.max_deliveries is not None
    return Resolved(
        ack=layered.ack,
        max_deliveries=layered.max_deliveries,
        retry=layered.retry,
        dead_letter=layered.dead_letter,
        unique=Unique() if layered.unique is True else (layered.unique or None),
    )


def _describe(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses as dicts (``None`` fields left out), classes
    and functions by their qualified name, anything else unknown by its ``repr``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _describe(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        return {str(key): _describe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_describe(item) for item in value]
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None)
        name = getattr(value, "__qualname__", None) or repr(value)
        return f"{module}.{name}" if module and module != "builtins" else name
    return repr(value)


def unique_for(
    policies: Policies, task: str | None, queue: str | None, asked: Any = None
) -> Unique | None:
    """How a publish of ``task`` into ``queue`` is deduplicated: the message's own
    ``celery_msg_unique`` header (``asked``: true, or ``"start"``) first, else the policy."""
    if asked:
        return Unique(until="start") if asked == "start" else Unique()
    if task is None:
        return None
    return policies.resolve(task, queue).unique


def policies_from(value: Any) -> Policies:
    """The app's ``msg_policies`` setting (a :class:`Policies`, or None for the defaults)."""
    if value is None:
        return Policies()
    if not isinstance(value, Policies):
        raise ConfigurationError(
            f"msg_policies: must be a celery_msg.Policies, got {type(value).__name__}"
        )
    return value
