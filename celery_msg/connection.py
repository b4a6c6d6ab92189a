"""From a broker URL (as kombu parsed it) to redis-py connection parameters.

Kept apart from the transport so the rules are plain and testable: the path is a database
number; ``celery-msgs://`` (or ``broker_use_ssl``) means TLS that verifies the server's
certificate unless told otherwise (kombu's own ``rediss://`` default is CERT_NONE); unknown
TLS options are refused by name instead of being ignored.

Sentinel URLs take kombu's form, one URL per sentinel joined by ``;``:
``celery-msg+sentinel://[user:password@]host:26379[/db];celery-msg+sentinel://host2:26379``
(``celery-msgs+sentinel://`` for TLS to the data nodes). kombu reads ``a+b://`` as transport
``a`` with the rest left unparsed in ``hostname``, and keeps every ``;`` part in ``alt``: the
sentinels come from there. The URL's credentials, database and TLS are the data nodes' (as in
kombu); the sentinels' own come from the ``sentinel_kwargs`` transport option.

Redis Cluster URLs take the Sentinel form, one URL per startup node joined by ``;``:
``celery-msg+cluster://[user:password@]host:port[/0];celery-msg+cluster://host2:port``
(``celery-msgs+cluster://`` for TLS; commas inside one part are read too, but Celery's banner
cannot print such a URL). Any node will do: the client learns the others and the slot map from
it, and kombu failing over to the next ``;`` part reads the same nodes. Cluster has no
``SELECT``, so a database other than 0 is refused.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from .errors import BrokerConnectionError, ConfigurationError
from .options import TransportOptions
from .redisio import translated

TLS_SCHEME = "celery-msgs"
DEFAULT_PORT = 6379
SENTINEL = "sentinel"
CLUSTER = "cluster"
DEFAULT_SENTINEL_PORT = 26379

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_OPTIONS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_ca_path",
        "ssl_password",
    }
)


@dataclass(frozen=True)
class BrokerAddress:
    """The parts of a broker URL that say where Redis is and how to log in."""

    scheme: str
    hostname: str | None = None
    port: int | None = None
    virtual_host: str | int | None = None
    userid: str | None = None
    password: str | None = None
    ssl: Mapping[str, Any] | bool | None = field(default=None)

    @classmethod
    def from_kombu(cls, client: Any) -> BrokerAddress:
        """Read a ``kombu.Connection``."""
        return cls(
            scheme=str(client.transport_cls),
            hostname=client.hostname,
            port=client.port,
            virtual_host=client.virtual_host,
            userid=client.userid,
            password=client.password,
            ssl=client.ssl,
        )


def database(virtual_host: str | int | None) -> int:
    """The database number of a URL path (``/0``, ``0``, empty)."""
    try:
        db = int(str(virtual_host or "0").lstrip("/") or 0)
    except ValueError:
        db = -1
    if db < 0:
        raise ConfigurationError(
            f"broker URL: the path must be a database number >= 0, got {virtual_host!r}"
        )
    return db


def redis_params(address: BrokerAddress, options: TransportOptions) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` (without ``retry``: the transport sets that)."""
    params: dict[str, Any] = {
        "host": address.hostname or "127.0.0.1",
        "port": address.port or DEFAULT_PORT,
        "db": database(address.virtual_host),
        "username": address.userid or None,
        "password": address.password or None,
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": (
            options.socket_timeout
            if options.socket_connect_timeout is None
            else options.socket_connect_timeout
        ),
        "socket_keepalive": options.socket_keepalive,
        "socket_keepalive_options": (
            dict(options.socket_keepalive_options) if options.socket_keepalive_options else None
        ),
        "health_check_interval": options.health_check_interval,
        "client_name": options.client_name or f"celery-msg:{socket.gethostname()}:{os.getpid()}",
    }
    if options.max_connections is not None:
        params["max_connections"] = options.max_connections
    if address.scheme == TLS_SCHEME or address.ssl:
        params.update(tls_params(address.ssl))
    return params


def tls_params(given: Mapping[str, Any] | bool | None) -> dict[str, Any]:
    """TLS keyword arguments; verifies the server certificate unless told otherwise."""
    tls = dict(given) if isinstance(given, Mapping) else {}
    reqs = tls.pop("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(reqs, str):
        try:
            reqs = _CERT_REQS[reqs.lower().removeprefix("cert_")]
        except KeyError:
            raise ConfigurationError(
                f"ssl_cert_reqs must be none, optional or required, got {reqs!r}"
            ) from None
    unknown = sorted(set(tls) - _TLS_OPTIONS)
    if unknown:
        raise ConfigurationError(f"unknown TLS option(s) in broker_use_ssl: {', '.join(unknown)}")
    return {"ssl": True, "ssl_cert_reqs": reqs, **tls}


def _parts(client: Any, kind: str) -> tuple[str, list[tuple[str, str]]] | None:
    """For a ``kombu.Connection`` whose URL is ``<transport>+<kind>://...`` (``;`` parts): the
    transport, and each part as given and without ``<transport>+``; None for other URLs.

    kombu reads ``a+b://`` as transport ``a`` with the rest left unparsed in ``hostname``, and
    keeps every ``;`` part in ``alt``; when it fails over to another part it parses that one
    whole, as transport ``a+b`` (see registration.py)."""
    transport = str(client.transport_cls)
    if transport.endswith(f"+{kind}"):
        transport = transport.removesuffix(f"+{kind}")
    elif not str(client.hostname or "").startswith(f"{kind}://"):
        return None
    urls: Sequence[str] = client.alt or [client.hostname]
    return transport, [
        (url, url[url.index("+") + 1 :] if "+" in url.split("://", 1)[0] else url) for url in urls
    ]


@dataclass(frozen=True)
class SentinelAddress:
    """Where the sentinels are, and how to reach the master they name (the data node)."""

    sentinels: tuple[tuple[str, int], ...]
    data: BrokerAddress


def sentinel_address(client: Any) -> SentinelAddress | None:
    """The sentinels of a ``kombu.Connection`` with a ``celery-msg+sentinel://`` URL, else None."""
    found = _parts(client, SENTINEL)
    if found is None:
        return None
    transport, parts = found
    sentinels: list[tuple[str, int]] = []
    first = None
    for url, part in parts:
        parsed = urlsplit(part)
        if parsed.scheme != SENTINEL or not parsed.hostname:
            raise ConfigurationError(
                f"broker URL: every ';' part of a Sentinel URL must be "
                f"celery-msg+sentinel://host:port, got {url!r}"
            )
        sentinels.append((parsed.hostname, parsed.port or DEFAULT_SENTINEL_PORT))
        first = first or parsed
    assert first is not None
    return SentinelAddress(
        sentinels=tuple(sentinels),
        data=BrokerAddress(
            scheme=transport,
            virtual_host=first.path,
            userid=unquote(first.username) if first.username else None,
            password=unquote(first.password) if first.password else None,
            ssl=client.ssl,
        ),
    )


class SentinelMasterConnection(SentinelManagedConnection):
    """redis-py's Sentinel connection asks the sentinels for the master in ``connect()`` only,
    which its pool calls; a connection made outside the pool (the worker's BLPOP connection)
    and used at once connects through ``connect_check_health``, to redis-py's default address
    (localhost:6379). Here every first connection asks the sentinels."""

    _locating = False

    def connect(self) -> None:
        self._locating = True
        try:
            super().connect()  # type: ignore[no-untyped-call]
        finally:
            self._locating = False

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if self._sock is None and not self._locating:
            self.connect()
            return
        super().connect_check_health(*args, **kwargs)


class SentinelMasterSSLConnection(SentinelMasterConnection, SSLConnection):
    """:class:`SentinelMasterConnection` over TLS."""


def sentinel_params(
    address: SentinelAddress, options: TransportOptions
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels and the keyword arguments for ``redis.sentinel.Sentinel``: the data nodes'
    connection parameters, and ``sentinel_kwargs`` for the sentinels' own connections."""
    if not options.master_name:
        raise ConfigurationError(
            "master_name: a celery-msg+sentinel:// broker URL needs the transport option "
            "master_name (the name the sentinels monitor)"
        )
    params = redis_params(address.data, options)
    del params["host"], params["port"]
    # As redis-py does when none are given: the sentinels get the data nodes' socket options.
    own = {k: v for k, v in params.items() if k.startswith("socket_")}
    own.update(options.sentinel_kwargs or {})
    params["sentinel_kwargs"] = own
    params["min_other_sentinels"] = options.min_other_sentinels
    tls = params.pop("ssl", False)
    params["connection_class"] = SentinelMasterSSLConnection if tls else SentinelMasterConnection
    return list(address.sentinels), params


@dataclass(frozen=True)
class ClusterAddress:
    """The startup nodes of a Redis Cluster, and how to log in to its nodes."""

    nodes: tuple[tuple[str, int], ...]
    data: BrokerAddress


def cluster_address(client: Any) -> ClusterAddress | None:
    """The nodes of a ``kombu.Connection`` with a ``celery-msg+cluster://`` URL, else None."""
    found = _parts(client, CLUSTER)
    if found is None:
        return None
    transport, parts = found
    nodes: list[tuple[str, int]] = []
    first = None
    for url, part in parts:
        scheme, _, rest = part.partition("://")
        netloc, _, path = rest.partition("/")
        userinfo, _, hosts = netloc.rpartition("@")
        if scheme != CLUSTER or not hosts:
            raise ConfigurationError(
                f"broker URL: every ';' part of a Cluster URL must be "
                f"celery-msg+cluster://host:port, got {url!r}"
            )
        if database(path) != 0:
            raise ConfigurationError(
                f"broker URL: Redis Cluster has only database 0 (no SELECT), got /{path} in "
                f"{url!r}: drop the path or use /0 (keep apps apart with the prefix option)"
            )
        for host in hosts.split(","):
            nodes.append(_node(host, url))
        first = first or userinfo
    user, _, password = (first or "").partition(":")
    return ClusterAddress(
        nodes=tuple(nodes),
        data=BrokerAddress(
            scheme=transport,
            userid=unquote(user) if user else None,
            password=unquote(password) if password else None,
            ssl=client.ssl,
        ),
    )


def _node(host: str, url: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{host.strip()}")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError:
        port = -1
    if not parsed.hostname or port < 0:
        raise ConfigurationError(
            f"broker URL: every node of a Cluster URL must be host[:port], got {host!r} in {url!r}"
        )
    return parsed.hostname, port


def cluster_client(address: ClusterAddress, options: TransportOptions, retry: Retry) -> redis.Redis:
    """redis-py's cluster client for ``address``.

    It follows ``MOVED`` / ``ASK`` by itself (the command did not run where it was refused, so
    sending it again is safe) but, with ``retry`` at 0, never resends a command after a
    connection error: the reply of a script may have been lost after it ran. Typed as
    ``redis.Redis``, whose command methods it shares; what differs (multi-key commands,
    transactions, BLPOP on several slots) is done per slot by the broker
    (:mod:`celery_msg.slots`).
    """
    _refuse_sentinel_options(options)
    params = redis_params(address.data, options)
    del params["host"], params["port"], params["db"]
    startup = [ClusterNode(host, port) for host, port in address.nodes]  # type: ignore[no-untyped-call]
    nodes = ",".join(f"{host}:{port}" for host, port in address.nodes)
    try:
        # Connects at once: it reads the slot map from the first node that answers (and asks
        # COMMAND: an ACL user without it cannot connect, see README, Running on Redis Cluster).
        cluster = RedisCluster(startup_nodes=startup, retry=retry, **params)
    except RedisClusterException as exc:
        raise BrokerConnectionError(f"cannot reach the Redis Cluster at {nodes}: {exc}") from exc
    except redis.RedisError as exc:
        ours = translated(exc, f"connect to the Redis Cluster at {nodes}")
        if ours is None:
            raise
        raise ours from exc
    return cast(redis.Redis, cluster)


def _refuse_sentinel_options(options: TransportOptions) -> None:
    """A Cluster has no sentinels: their options would be ignored, so they are refused."""
    if options.master_name is not None:
        raise ConfigurationError("master_name: only used with a celery-msg+sentinel:// broker URL")
    if options.sentinel_kwargs is not None:
        raise ConfigurationError(
            "sentinel_kwargs: only used with a celery-msg+sentinel:// broker URL"
        )
    if options.min_other_sentinels:
        raise ConfigurationError(
            "min_other_sentinels: only used with a celery-msg+sentinel:// broker URL"
        )


def redis_client(client: Any, options: TransportOptions) -> tuple[redis.Redis, str]:
    """The redis-py client for a ``kombu.Connection``, and where it points (for messages).

    No retries inside redis-py: a script whose reply was lost must not silently run twice (a
    second publish, a second fetch), and outages must surface at once so that kombu and Celery
    reconnect with their own backoff. With Sentinel, every new connection asks the sentinels
    for the master; a connection to a master that was demoted meanwhile fails with ``READONLY``,
    which redis-py's Sentinel connection turns into a connection error: a reconnect, not a
    crash.
    """
    retry = Retry(NoBackoff(), 0)
    cluster = cluster_address(client)
    if cluster is not None:
        where = "cluster " + ",".join(f"{host}:{port}" for host, port in cluster.nodes)
        return cluster_client(cluster, options, retry), where
    sentinel = sentinel_address(client)
    if sentinel is None:
        if options.master_name is not None:
            raise ConfigurationError(
                "master_name: only used with a celery-msg+sentinel:// broker URL"
            )
        params = redis_params(BrokerAddress.from_kombu(client), options)
        return redis.Redis(**params, retry=retry), f"{params['host']}:{params['port']}"
    hosts, params = sentinel_params(sentinel, options)
    assert options.master_name is not None  # sentinel_params checked it
    manager = Sentinel(hosts, **params)  # type: ignore[no-untyped-call]
    where = f"master {options.master_name!r} of sentinels " + ",".join(
        f"{host}:{port}" for host, port in hosts
    )
    master: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        options.master_name, redis_class=redis.Redis, retry=retry
    )
    return master, where
