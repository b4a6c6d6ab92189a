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
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .errors import ConfigurationError
from .options import TransportOptions

TLS_SCHEME = "celery-msgs"
DEFAULT_PORT = 6379
SENTINEL = "sentinel"
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


@dataclass(frozen=True)
class SentinelAddress:
    """Where the sentinels are, and how to reach the master they name (the data node)."""

    sentinels: tuple[tuple[str, int], ...]
    data: BrokerAddress


def sentinel_address(client: Any) -> SentinelAddress | None:
    """The sentinels of a ``kombu.Connection`` with a ``celery-msg+sentinel://`` URL, else None."""
    transport = str(client.transport_cls)
    if transport.endswith(f"+{SENTINEL}"):
        # kombu failed over to another ';' part and parsed it whole (see registration.py).
        transport = transport.removesuffix(f"+{SENTINEL}")
    elif not str(client.hostname or "").startswith(f"{SENTINEL}://"):
        return None
    urls: Sequence[str] = client.alt or [client.hostname]
    sentinels: list[tuple[str, int]] = []
    first = None
    for url in urls:
        part = url[url.index("+") + 1 :] if "+" in url.split("://", 1)[0] else url
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
    return list(address.sentinels), params


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
