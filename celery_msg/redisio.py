"""Redis I/O under the broker: errors translated, script calls packed and pipelined.

Why its own module: this is the part that knows RESP and redis-py's connection handling, not
messages. :class:`~celery_msg.core.Broker` decides *which* script runs with which KEYS and ARGV;
this module sends them: one pipelined round trip of ``EVALSHA`` calls (redis-py's own script
pipelining asks ``SCRIPT EXISTS`` first, a second round trip on a hot path), a script Redis lost
loaded again, and a publisher's connection kept out of the pool. redis-py errors become
:mod:`celery_msg.errors` here, with their cause kept.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from .errors import (
    AuthenticationFailed,
    BrokerConnectionError,
    PermissionDenied,
    ReplicationTimeout,
    ScriptError,
)
from .scripts import where
from .slots import is_cluster

#: redis-py errors that mean "the connection, not the command, failed".
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    OSError,
)

#: A Cluster that could not serve a command yet (redis-py's ``TTL exhausted`` after following
#: redirections, ``TRYAGAIN`` while a slot's keys are split by a migration, ``CLUSTERDOWN``).
_CLUSTER_BUSY: tuple[type[BaseException], ...] = (
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
)

#: How Redis and Valkey word an ACL refusal inside a script (a plain error reply there).
_ACL_DENIED = re.compile(r"can't run this command|ACL failure in script|no permissions", re.I)


@dataclass(frozen=True)
class Replication:
    """``WAIT replicas timeout_ms`` after every state change (transport option
    ``min_replicas``): sent on the same connection in the same round trip, since ``WAIT`` only
    counts the writes of its own connection."""

    replicas: int
    timeout_ms: int

    @property
    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def packed(self) -> bytes:
        return b"*3\r\n" + b"".join(bulk(part) for part in self.command)

    def check(self, reply: Any, what: str, results: list[Any] | None = None) -> None:
        """Raise :class:`ReplicationTimeout` unless ``reply`` (WAIT's) confirms enough."""
        if isinstance(reply, BaseException):
            raise translated(reply, f"{what}: WAIT") or reply
        confirmed = int(reply)
        if confirmed < self.replicas:
            raise ReplicationTimeout(
                f"{what}: confirmed by {confirmed} of min_replicas={self.replicas} replica(s) "
                f"within {self.timeout_ms} ms: it is on the master only, and lost if the master "
                f"fails before it replicates",
                confirmed,
                results,
            )


@contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Re-raise redis-py errors as celery-msg errors, keeping the cause."""
    try:
        yield
    except Exception as exc:
        ours = translated(exc, what)
        if ours is None:
            raise
        raise ours from exc


def translated(exc: BaseException, what: str) -> Exception | None:
    """The celery-msg error for a redis-py error (None: not one to translate). NoScriptError
    is left alone: the caller loads the script again."""
    if isinstance(exc, redis.exceptions.NoScriptError):
        return None
    if isinstance(exc, redis.exceptions.NoPermissionError) or (
        isinstance(exc, redis.ResponseError) and _ACL_DENIED.search(str(exc))
    ):
        # Inside a script Redis 7.0 does not name the command: name the script line instead.
        line = where(str(exc))
        return PermissionDenied(
            f"{what}: the broker URL's ACL user may not run this (see README, Security): {exc}"
            + (f" [{line}]" if line else "")
        )
    if isinstance(exc, _CLUSTER_BUSY):
        # The command did not run: redis-py's redirections ran out while a slot moved or a
        # master failed over. As a lost connection: try again, do not give up on the work.
        return BrokerConnectionError(f"{what}: the Cluster is reconfiguring: {exc}")
    if isinstance(exc, redis.ResponseError):
        return ScriptError(f"{what}: {exc}")
    if isinstance(exc, redis.AuthenticationError):  # a ConnectionError in redis-py
        return AuthenticationFailed(f"{what}: Redis refused the credentials: {exc}")
    if isinstance(exc, REDIS_CONNECTION_ERRORS):
        return BrokerConnectionError(f"{what}: Redis unreachable: {exc}")
    return None


def text(value: bytes | str) -> str:
    """A reply as text (redis-py gives bytes unless the client decodes)."""
    return value.decode() if isinstance(value, bytes) else value


class DedicatedConnection:
    """One Redis connection kept out of the pool for a hot path (publishing).

    redis-py checks a connection out of its pool and back in for every command, which costs
    more Python than the command itself on a small machine; a publisher sends one command at
    a time, so it keeps one connection. One thread uses it at a time: a caller that finds it
    busy gets ``None`` and uses the pool. After a fork the child takes a connection of its own.
    """

    def __init__(self, client: redis.Redis, replication: Replication | None = None) -> None:
        self.client = client
        self.replication = replication
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = os.getpid()

    def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self.execute(script, pack_evalsha(script, keys, args))

    def execute(self, script: Script, packed: bytes) -> Any:
        """Send one already packed ``EVALSHA`` of ``script`` and read its reply; ``BUSY``
        when another thread holds the connection."""
        if not self._lock.acquire(blocking=False):
            return BUSY
        try:
            if self._pid != os.getpid():
                self._conn, self._pid = None, os.getpid()  # the parent's socket is not ours
            conn = self._conn
            if conn is None:
                conn = self._conn = self.client.connection_pool.get_connection()
            try:
                if is_stale(conn):
                    # Closed by the server while idle (restart, idle timeout, a proxy): nothing
                    # was sent yet, so reconnecting is safe, as redis-py's pool does.
                    conn.disconnect()
                return self._call(conn, script, packed)
            except redis.ResponseError:
                raise  # an error reply: the connection itself is fine
            except BaseException:
                self._conn = None
                conn.disconnect()
                self.client.connection_pool.release(conn)
                raise
        finally:
            self._lock.release()

    def _call(self, conn: Any, script: Script, packed: bytes) -> Any:
        replication = self.replication
        if replication is not None:
            return self._call_replicated(conn, script, packed, replication)
        try:
            conn.send_packed_command((packed,))
            return conn.read_response()
        except redis.exceptions.NoScriptError:
            # Redis restarted or SCRIPT FLUSH: load it again, on this connection. The same text
            # has the same SHA1, so the packed command stays valid.
            self._load(conn, script)
            conn.send_packed_command((packed,))
            return conn.read_response()

    def _call_replicated(
        self, conn: Any, script: Script, packed: bytes, replication: Replication
    ) -> Any:
        """The call and its WAIT in one round trip; the WAIT's reply is always read (an
        unread reply would be taken for the next command's)."""
        for attempt in (1, 2):
            conn.send_packed_command((packed, replication.packed()))
            try:
                reply = conn.read_response()
            except redis.exceptions.NoScriptError:
                conn.read_response()  # WAIT's: nothing was written
                if attempt == 2:
                    raise
                self._load(conn, script)
                continue
            except redis.ResponseError:
                conn.read_response()
                raise
            replication.check(conn.read_response(), "publish", [reply])
            return reply
        raise AssertionError("unreachable: the second attempt returns or raises")

    @staticmethod
    def _load(conn: Any, script: Script) -> None:
        conn.send_command("SCRIPT", "LOAD", script.script)
        if text(conn.read_response()) != script.sha:
            raise redis.exceptions.NoScriptError(f"SCRIPT LOAD gave another SHA for {script.sha}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self.client.connection_pool.release(self._conn)
                self._conn = None


#: What :meth:`DedicatedConnection.execute` returns when another thread holds the connection.
BUSY = object()

#: One script call: the script, its KEYS, its ARGV.
ScriptCall = tuple[Script, Sequence[str], Sequence[Any]]


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string, encoded as redis-py encodes arguments (str as UTF-8, int as text)."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_head(script: Script, keys: Sequence[str], argc: int) -> bytes:
    """The fixed part of ``EVALSHA sha numkeys keys...`` that ``argc`` arguments will follow.

    Cached: a queue's keys are the same tuple on every call (``QueueKeys.all``), and packing
    its 19 keys was a fifth of a solo worker's own time per task (its ack is one call)."""
    if isinstance(keys, tuple):
        return _cached_head(script.sha, keys, argc)
    return _pack_head(script.sha, keys, argc)


def _pack_head(sha: str, keys: Sequence[str], argc: int) -> bytes:
    head = [b"*%d\r\n" % (3 + len(keys) + argc), bulk("EVALSHA"), bulk(sha)]
    head.append(bulk(len(keys)))
    head.extend(bulk(key) for key in keys)
    return b"".join(head)


#: Bounded: a key tuple per queue and argument count (a batch of n acks has 2n arguments).
_cached_head = functools.lru_cache(maxsize=4096)(_pack_head)


def pack_evalsha(script: Script, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    return pack_head(script, keys, len(args)) + b"".join([bulk(arg) for arg in args])


def is_stale(conn: Any) -> bool:
    """True when an idle connection has something to read: EOF or unexpected data."""
    try:
        return bool(conn.can_read())
    except (redis.ConnectionError, OSError):
        return True


def run_scripts(
    client: redis.Redis, calls: Sequence[ScriptCall], replication: Replication | None = None
) -> list[Any]:
    """Run script calls in one pipelined round trip; their replies, in order.

    redis-py's own pipelining of scripts asks ``SCRIPT EXISTS`` first: a second round trip
    on every call, on the consumer's hot path. Here each ``EVALSHA`` goes as it is; a script
    Redis lost (restart, ``SCRIPT FLUSH``) is loaded again and only its calls are sent
    again (the others have run). An error reply is raised, as redis-py would. With
    ``replication``, the round trip ends with its ``WAIT`` (see :class:`Replication`).
    """
    results = script_replies(client, calls, replication)
    for reply in results:
        if isinstance(reply, redis.ResponseError):
            raise reply
    return results


def script_replies(
    client: redis.Redis, calls: Sequence[ScriptCall], replication: Replication | None = None
) -> list[Any]:
    """:func:`run_scripts`, but an error reply stays in the list (one broken queue must not
    keep the calls of the others from being read); connection errors still raise, and so does
    a :class:`ReplicationTimeout` (carrying the replies)."""
    if replication is not None and is_cluster(client):
        return _replicated_on_cluster(client, calls, replication)
    results, waited = _evalsha_all(client, calls, replication)
    missing = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
    if missing:
        for i in missing:
            script, keys, _ = calls[i]
            load_script(client, script, keys)
        replies, waited_again = _evalsha_all(client, [calls[i] for i in missing], replication)
        for i, reply in zip(missing, replies, strict=True):
            results[i] = reply
        if replication is not None:
            # Both round trips must be confirmed; a pipeline may use another connection.
            replication.check(waited, f"{len(calls)} script calls", results)
            waited = waited_again
    if replication is not None:
        replication.check(waited, f"{len(calls)} script calls", results)
    return results


#: How many times a Cluster call refused with MOVED is sent again after reading the slot map.
MOVED_ATTEMPTS = 3


def _replicated_on_cluster(
    client: redis.Redis, calls: Sequence[ScriptCall], replication: Replication
) -> list[Any]:
    """:func:`script_replies` with ``min_replicas`` on a Cluster: ``WAIT`` counts the writes of
    its own connection, so the calls go to each node's own client (grouped by the node of
    their slot), each group pipelined with its ``WAIT``. A call refused with ``MOVED`` (the slot
    moved) ran nowhere: it is sent again once the slot map is read again. Every node's
    ``WAIT`` must confirm; a shortfall raises one :class:`ReplicationTimeout` with all replies."""
    results: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    short: ReplicationTimeout | None = None
    for _ in range(MOVED_ATTEMPTS):
        by_node: dict[str, list[int]] = {}
        for i in pending:
            node = client.get_node_from_key(calls[i][1][0])  # type: ignore[attr-defined]
            by_node.setdefault(node.name, []).append(i)
        for name, indices in by_node.items():
            node_client = client.get_node(node_name=name).redis_connection  # type: ignore[attr-defined]
            try:
                replies = script_replies(node_client, [calls[i] for i in indices], replication)
            except ReplicationTimeout as exc:
                replies, short = list(exc.results), exc
            for i, reply in zip(indices, replies, strict=True):
                results[i] = reply
        pending = [i for i in pending if isinstance(results[i], redis.exceptions.MovedError)]
        if not pending:
            break
        client.nodes_manager.initialize()  # type: ignore[attr-defined]
    if short is not None:
        raise ReplicationTimeout(str(short), short.confirmed, results)
    return results


def load_script(client: redis.Redis, script: Script, keys: Sequence[str]) -> None:
    """Load ``script`` where a call with ``keys`` may run. On a Cluster: on every master that
    answers (redis-py's own reload goes to every master at once, and fails while any one is
    down), since the slot map may be behind (a slot just moved: the call is redirected to a
    node the map does not name yet)."""
    if not is_cluster(client):
        sha = client.script_load(script.script)
        if text(sha) != script.sha:
            raise redis.exceptions.NoScriptError(f"SCRIPT LOAD gave another SHA for {script.sha}")
        return
    loaded = 0
    for node in client.get_primaries():  # type: ignore[attr-defined]
        try:
            client.execute_command("SCRIPT", "LOAD", script.script, target_nodes=node)  # type: ignore[no-untyped-call]
            loaded += 1
        except REDIS_CONNECTION_ERRORS:
            continue  # a master that is down: a call there finds it missing again later
    if not loaded:
        raise redis.ConnectionError(f"no master of the Cluster answered SCRIPT LOAD ({keys[:1]})")


def evalsha(client: redis.Redis, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """One ``EVALSHA``, the script loaded where it runs if that node lacks it (see
    :func:`load_script`): what ``Script.__call__`` does, but right on a Cluster."""
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        load_script(client, script, keys)
        return client.evalsha(script.sha, len(keys), *keys, *args)


def _evalsha_all(
    client: redis.Redis, calls: Sequence[ScriptCall], replication: Replication | None
) -> tuple[list[Any], Any]:
    """One pipeline of EVALSHA calls (and the WAIT, if any); error replies come back in the
    list, not raised. Returns the replies and the WAIT's reply (None without one)."""
    pipe = client.pipeline(transaction=False)
    cluster = is_cluster(client)
    for script, keys, args in calls:
        # On a Cluster each call names its node: redis-py's Cluster pipeline otherwise asks
        # the default node COMMAND GETKEYS for every EVALSHA (a round trip each, and while
        # that node is down every call fails, to the live shards too). A MOVED reply is
        # still followed (redis-py sends the call again, routed by its keys).
        node = {"target_nodes": client.get_node_from_key(keys[0])} if cluster and keys else {}  # type: ignore[attr-defined]
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, **node)  # type: ignore[no-untyped-call]
    if replication is not None:
        pipe.execute_command(*replication.command)  # type: ignore[no-untyped-call]
    results = list(pipe.execute(raise_on_error=False))
    for reply in results:
        # A Cluster pipeline hands back a node's connection error as a reply, like an error
        # reply: it is not one (the calls to that node may or may not have run).
        if isinstance(reply, BaseException) and not isinstance(reply, redis.ResponseError):
            raise reply
    waited = results.pop() if replication is not None else None
    return results, waited
