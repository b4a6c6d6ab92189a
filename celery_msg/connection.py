"""From a broker URL (as kombu parsed it) to redis-py connection parameters.

Kept apart from the transport so the rules are plain and testable: the path is a database
number; ``celery-msgs://`` (or ``broker_use_ssl``) means TLS that verifies the server's
certificate unless told otherwise (kombu's own ``rediss://`` default is CERT_NONE); unknown
TLS options are refused by name instead of being ignored.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError
from .options import TransportOptions

TLS_SCHEME = "celery-msgs"
DEFAULT_PORT = 6379

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
