"""Helpers for the direct tests of the Lua scripts: set keys up by hand, read the whole state back.

Every test works on queues under its own ``prefix`` and calls the scripts with a fixed ``NOW``,
so the expected key state can be written out in full. :meth:`Lab.state` returns every existing
key of a queue (by its part name, see ``QUEUE_KEY_PARTS``) decoded to plain Python values:

- ZSET   -> list of ``(member, score)`` in ZRANGE order, scores as ints
- HASH   -> ``{field: value}``
- STRING -> ``value``
- LIST   -> ``[element, ...]``

Keys that do not exist are left out, so ``lab.state() == {...}`` pins down the whole queue.
``lab.expect()`` builds such a dict one message at a time (:class:`Expected`: ``.ready``,
``.leased``, ``.scheduled``, ``.dead``, ``.duplicates``, then ``.plus`` for counters and stats).

Test modules cannot import from a conftest reliably (tests/ has no packages), so everything they
need is reached through the ``lab`` fixture: ``lab.now``, ``lab.lease``, ``lab.back(band, n)``,
``lab.front(band, m)``, ``lab.order(band, n)``, ``lab.ticks((seq, time), ...)`` and one method
per script.

``order`` maps every stored key that is not READY to the ready score it was published with
(``back(band, n)``, n its publish sequence number); requeue, reclaim, promotion and replay read
its band from there. A READY message has no entry (its ready score holds band and n): reserve
writes it when it takes the message. The hand-made setups write it too: ``add_leased``,
``add_dead``, ``add_scheduled`` ``back(band, seq)`` (``seq`` 0 unless a test cares), and
``add_ready(..., legacy=True)`` the given score, as an older version stored a READY message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis

from celery_msg import transitions as tr
from celery_msg.keys import QUEUE_KEY_PARTS, QueueKeys
from celery_msg.scripts import BAND, MID

#: The fixed clock of these tests (ms).
NOW = 1_000_000
#: The lease used unless a test says otherwise (ms).
LEASE = 30_000


def back(band: int, n: int) -> int:
    """The ready score of the n-th sequence number appended to the back of ``band``."""
    return band * BAND + MID + n


def front(band: int, n: int) -> int:
    """The ready score of a message of ``band`` published as sequence number ``n`` that came
    back (requeued, reclaimed): at the front, in publish order."""
    return band * BAND + n


def order(band: int, n: int) -> str:
    """The ``order`` entry (as stored) of the n-th sequence number published into ``band``."""
    return str(back(band, n))


def ticks(*pairs: tuple[int, int]) -> list[tuple[str, int]]:
    """The ``clock`` key as :meth:`Lab.state` reads it, from (sequence number, time) ticks."""
    return [(str(at), seq) for seq, at in pairs]


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _score(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def deliveries(reply: tr.ReserveReply) -> list[tuple[int, str, int, int, str]]:
    """reserve's reply as ``(group, key, token, delivery count, payload)`` tuples."""
    return [(m.group, m.key, m.token, m.deliveries, _text(m.payload)) for m in reply.messages]


class Expected:
    """A builder for an expected :meth:`Lab.state`, one message at a time: each call adds what a
    message in that state holds across the queue's keys (its sorted set entry, ``body``,
    ``order``, per-message hash fields), so a test lists its messages, not its keys.

    Sorted sets come out in ZRANGE order (score, then member), as :meth:`Lab.state` reads them.
    Everything not about one message (``seq``, ``signal``, ``stats``, ``dups``, ...) goes in
    :meth:`plus`; :attr:`state` is the finished dict, to compare with ``lab.state()``.
    """

    def __init__(self) -> None:
        self._zsets: dict[str, list[tuple[str, int]]] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        self._rest: dict[str, Any] = {}

    def ready(
        self,
        key: str,
        body: str,
        *,
        band: int = 0,
        seq: int,
        at: int | None = None,
        legacy: bool = False,
        **fields: int,
    ) -> Expected:
        """READY, published as sequence number ``seq`` of ``band``: at score ``at``, by default
        where publish put it (``back(band, seq)``); no ``order`` entry unless ``legacy`` (stored
        by an older version). ``fields``: ``deliv``, and ``born`` (its publish time) where
        publish wrote one."""
        score = back(band, seq) if at is None else at
        self._message("ready", key, score, body, band, seq, placed=legacy)
        return self._fields(key, **fields)

    def leased(
        self,
        key: str,
        body: str,
        *,
        until: int,
        token: int,
        band: int = 0,
        seq: int = 0,
        **fields: Any,
    ) -> Expected:
        """RESERVED with ``token`` until ``until``; ``fields``: ``owner`` (c1 unless given) and
        ``deliv`` (1 unless given)."""
        self._message("leased", key, until, body, band, seq)
        return self._fields(key, token=token, **{"owner": "c1", "deliv": 1, **fields})

    def dead(
        self, key: str, body: str, *, at: int, band: int = 0, seq: int = 0, **fields: Any
    ) -> Expected:
        """DEAD since ``at``; ``fields``: ``deliv`` (1 unless given) and ``reason`` (its record;
        left out where the test checks it apart)."""
        self._message("dead", key, at, body, band, seq)
        return self._fields(key, **{"deliv": 1, **fields})

    def scheduled(
        self, key: str, body: str, *, due: int, band: int = 0, seq: int = 0, **fields: int
    ) -> Expected:
        """SCHEDULED until ``due``; ``fields``: ``born`` where publish wrote one."""
        self._message("sched", key, due, body, band, seq)
        return self._fields(key, **fields)

    def duplicates(self, original: str, *copies: str) -> Expected:
        """``copies`` stored as duplicates of the id ``original`` (each its ``dups`` entry), the
        last one its ``alias`` (where the next look-up of the id starts)."""
        self._hashes.setdefault("dups", {}).update(dict.fromkeys(copies, original))
        self._hashes.setdefault("alias", {})[original] = copies[-1]
        return self

    def plus(self, **parts: Any) -> Expected:
        """Keys that belong to no one message (``seq="3"``, ``stats={...}``, ...)."""
        self._rest.update(parts)
        return self

    @property
    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            part: sorted(entries, key=lambda e: (e[1], e[0]))
            for part, entries in self._zsets.items()
        }
        out.update(self._hashes)
        for part, value in self._rest.items():
            assert part not in out, f"{part} is built from the messages"
            out[part] = value
        return out

    def _message(
        self,
        zset: str,
        key: str,
        score: int,
        body: str,
        band: int,
        seq: int,
        *,
        placed: bool = True,
    ) -> None:
        self._zsets.setdefault(zset, []).append((key, score))
        self._fields(key, body=body)
        if placed:
            self._fields(key, order=order(band, seq))

    def _fields(self, key: str, **fields: int | str) -> Expected:
        for part, value in fields.items():
            self._hashes.setdefault(part, {})[key] = str(value)
        return self


class Lab:
    """One queue's keys, its scripts, and hand-made setup of its states."""

    now = NOW
    lease = LEASE
    back = staticmethod(back)
    front = staticmethod(front)
    order = staticmethod(order)
    ticks = staticmethod(ticks)

    def __init__(self, client: redis.Redis, scripts: tr.Scripts, keys: QueueKeys) -> None:
        self.client = client
        self.scripts = scripts
        self.keys = keys

    # -- reading ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Every existing key of the queue, decoded (see the module docstring)."""
        names = self.keys.all
        pipe = self.client.pipeline(transaction=False)
        for key in names:
            pipe.type(key)
        types = [_text(t) for t in pipe.execute()]
        pipe = self.client.pipeline(transaction=False)
        present: list[tuple[str, str]] = []
        for part, key, kind in zip(QUEUE_KEY_PARTS, names, types, strict=True):
            if kind == "none":
                continue
            present.append((part, kind))
            if kind == "zset":
                pipe.zrange(key, 0, -1, withscores=True)
            elif kind == "hash":
                pipe.hgetall(key)
            elif kind == "string":
                pipe.get(key)
            elif kind == "list":
                pipe.lrange(key, 0, -1)
            else:  # pragma: no cover - the schema has no other types
                raise AssertionError(f"unexpected type {kind} for {key}")
        out: dict[str, Any] = {}
        for (part, kind), raw in zip(present, pipe.execute(), strict=True):
            if kind == "zset":
                out[part] = [(_text(m), _score(s)) for m, s in raw]
            elif kind == "hash":
                out[part] = {_text(f): _text(v) for f, v in raw.items()}
            elif kind == "list":
                out[part] = [_text(e) for e in raw]
            else:
                out[part] = _text(raw)
        return out

    def record(self, reason: str, detail: str) -> dict[str, Any]:
        """The dead-letter record (decoded) a script writes for a first failure at ``now``."""
        at = self.now
        return {
            "reason": reason,
            "detail": detail,
            "time": at,
            "first_failure": at,
            "last_failure": at,
        }

    def expect(self) -> Expected:
        """An empty :class:`Expected` state, to add this test's messages to."""
        return Expected()

    def ready_order(self) -> list[str]:
        return [_text(m) for m in self.client.zrange(self.keys.ready, 0, -1)]

    # -- hand-made setup (plain Redis commands, no scripts) -------------------------------

    def add_ready(
        self,
        key: str,
        body: str,
        *,
        band: int = 0,
        score: int,
        deliv: int | None = None,
        legacy: bool = False,
    ) -> None:
        """A READY message as publish leaves it (no ``order`` entry), or, ``legacy``, as an
        older version left it: ``order`` holding its ready score."""
        assert score // BAND == band, "the score must lie in the message's band"
        fields = {} if deliv is None else {"deliv": deliv}
        self._add("ready", key, score, body, score if legacy else None, **fields)

    def add_leased(
        self,
        key: str,
        body: str,
        *,
        token: int,
        deadline: int,
        owner: str = "c1",
        band: int = 0,
        seq: int = 0,
        deliv: int = 1,
    ) -> None:
        """A RESERVED message, published as sequence number ``seq`` of ``band``."""
        self._add(
            "leased", key, deadline, body, back(band, seq), deliv=deliv, token=token, owner=owner
        )

    def add_dead(
        self,
        key: str,
        body: str,
        *,
        at: int,
        reason: str,
        band: int = 0,
        seq: int = 0,
        deliv: int = 1,
    ) -> None:
        """A DEAD message, published as sequence number ``seq`` of ``band``."""
        self._add("dead", key, at, body, back(band, seq), reason=reason, deliv=deliv)

    def _add(
        self, zset: str, key: str, score: int, body: str, order: int | None, **fields: int | str
    ) -> None:
        """One message in the sorted set ``zset`` (ready, leased, dead, sched) at ``score``,
        with its body, its ``order`` entry (unless None) and ``fields`` (a part per hash:
        deliv, token, ...)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(getattr(self.keys, zset), {key: score})
        pipe.hset(self.keys.body, key, body)
        if order is not None:
            pipe.hset(self.keys.order, key, order)
        for part, value in fields.items():
            pipe.hset(getattr(self.keys, part), key, value)
        pipe.execute()

    def set_args(self, **fields: int | str) -> None:
        """Store queue arguments as the declaration does (``message_ttl`` ms, ``max_length``,
        ``expires`` ms), or garbage, by hand."""
        self.client.hset(self.keys.args, mapping=fields)  # type: ignore[arg-type]

    def set_counter(self, part: str, value: int) -> None:
        self.client.set(getattr(self.keys, part), value)

    def redelivered(self, message_id: str = "m") -> tuple[str, int, int]:
        """Publish, lease to ``zombie`` at now, let the lease expire, redeliver to ``c2``.

        Returns ``(key, zombie's token, c2's token)``; c2's lease ends at now + 2 * lease.
        """
        key = self.publish(message_id, "payload", 0)
        [(_, _, old, _, _)] = self.reserve(count=1, consumer="zombie")
        [(_, again, new, deliv, _)] = self.reserve(
            now=self.now + self.lease, count=1, consumer="c2"
        )
        assert (again, deliv) == (key, 2)
        return key, old, new

    # -- script calls: through celery_msg.transitions, the wrappers the broker uses ---------

    def publish(self, message_id: str, payload: str | bytes, band: int = 0, **kwargs: Any) -> str:
        """publish.lua's message key (keyword arguments: :meth:`publish_reply`'s)."""
        return self.publish_reply(message_id, payload, band, **kwargs)[0]

    def publish_reply(
        self,
        message_id: str,
        payload: str | bytes,
        band: int = 0,
        *,
        due: int = 0,
        unique: bool = False,
        now: int = NOW,
        lock_until: int = 0,
        retry: bool = False,
    ) -> tuple[str, int]:
        """publish.lua's whole reply: (message key, 1 if stored else 0). Not routed through an
        exchange: no bindings version (ARGV[6] empty)."""
        args = tr.Publish.args(
            message_id=message_id,
            payload=payload,
            band=band,
            due_ms=due,
            unique=unique,
            route_version=tr.UNROUTED,
            now_ms=now,
            lock_until_ms=lock_until,
            retry=retry,
        )
        reply = self.scripts.publish.run(self.keys.publish, args)
        return reply.key, reply.code

    def unlock(self, *ids: str) -> int:
        return self.scripts.unlock.run(self.keys.all, tr.Unlock.args(ids))

    def next_due(self, *, now: int = NOW, count: int = 0) -> int:
        """The last entry of reserve's reply: the earliest due time still scheduled, or 0."""
        return self.reserve_reply(now=now, count=count).next_due_ms

    def promote(self, *, now: int = NOW, limit: int = 100) -> int:
        return self.scripts.promote.run(self.keys.all, tr.Promote.args(now_ms=now, limit=limit))

    def add_scheduled(self, key: str, body: str, *, due: int, band: int = 0, seq: int = 0) -> None:
        """A SCHEDULED message, published as sequence number ``seq`` of ``band``."""
        self._add("sched", key, due, body, back(band, seq))

    def reserve(self, **kwargs: Any) -> list[tuple[int, str, int, int, str]]:
        """Reserve from this queue (group 0), then ``others`` (groups 1, 2, ...): the messages
        of :meth:`reserve_reply` (same keyword arguments) as tuples."""
        return deliveries(self.reserve_reply(**kwargs))

    def reserve_reply(
        self,
        *,
        now: int = NOW,
        lease: int = LEASE,
        count: int = 1,
        consumer: str = "c1",
        mode: str = "fair",
        start: int = 0,
        reclaim_limit: int = 100,
        max_deliveries: int = 0,
        others: Sequence[Lab] = (),
    ) -> tr.ReserveReply:
        """reserve.lua's whole typed reply (the messages and the next due time)."""
        keys = list(self.keys.all)
        for lab in others:
            keys.extend(lab.keys.all)
        args = tr.Reserve.args(
            now_ms=now,
            lease_ms=lease,
            count=count,
            consumer=consumer,
            order=mode,
            start=start,
            reclaim_batch=reclaim_limit,
            max_deliveries=max_deliveries,
        )
        return self.scripts.reserve.run(keys, args)

    def ack(self, *pairs: tuple[str, int]) -> list[int]:
        return self.scripts.ack.run(self.keys.all, tr.Ack.args(pairs))

    def extend(self, *pairs: tuple[str, int], now: int = NOW, lease: int = LEASE) -> list[int]:
        args = tr.Extend.args(now_ms=now, lease_ms=lease, held=pairs)
        return self.scripts.extend.run(self.keys.all, args)

    def requeue(self, *pairs: tuple[str, int], uncount: bool = False) -> list[int]:
        args = tr.Requeue.args(uncount=uncount, held=pairs)
        return self.scripts.requeue.run(self.keys.all, args)

    def dead_letter(
        self, key: str, token: int, reason: str, *, now: int = NOW, word: str = "failed"
    ) -> int:
        """``reason`` is the record (JSON), ``word`` the reason counted (``dead:<word>``)."""
        args = tr.DeadLetter.args(now_ms=now, key=key, token=token, record=reason, word=word)
        return self.scripts.dead_letter.run(self.keys.all, args)

    def bury(
        self,
        message_id: str,
        payload: str = "P",
        *,
        band: int = 0,
        deliveries: int = 1,
        reason: str = '{"reason": "failed"}',
        word: str = "failed",
        now: int = NOW,
    ) -> str:
        args = tr.Bury.args(
            now_ms=now,
            message_id=message_id,
            payload=payload,
            band=band,
            deliveries=deliveries,
            record=reason,
            word=word,
        )
        return self.scripts.bury.run(self.keys.all, args)

    def reclaim(self, *, now: int = NOW, limit: int = 100) -> int:
        return self.scripts.reclaim.run(self.keys.all, tr.Reclaim.args(now_ms=now, limit=limit))

    def purge(self, limit: int) -> int:
        return self.scripts.purge.run(self.keys.all, tr.Purge.args(limit=limit))

    def oldest(self, *, now: int = NOW) -> int:
        """oldest.lua: the enqueue time (ms) of the oldest ready (or due) message, 0 for none."""
        return self.scripts.oldest.run(tr.Oldest.keys(self.keys), tr.Oldest.args(now_ms=now))


@pytest.fixture
def scripts(redis_client: redis.Redis) -> tr.Scripts:
    return tr.Scripts(redis_client)


@pytest.fixture
def make_lab(redis_client: redis.Redis, scripts: tr.Scripts, prefix: str) -> Callable[[str], Lab]:
    """Build a :class:`Lab` for queue ``name`` under this test's prefix."""

    def make(name: str) -> Lab:
        return Lab(redis_client, scripts, QueueKeys(name, prefix))

    return make


@pytest.fixture
def lab(make_lab: Callable[[str], Lab]) -> Lab:
    """The queue ``q`` of this test."""
    return make_lab("q")
