"""Keys, ACLs, TLS and serialisation: celery-msg writes only under its key prefix (so an ACL
user restricted to ``~<prefix>*`` can run it), speaks TLS on ``celery-msgs://``, and stores
messages as JSON, never pickle."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from celery_helpers import readme_acl, stack_factory
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError
from kombu_helpers import FAST, Receiver, connect, direct_queue, ids_of, publish, scan_keys

from celery_msg import (
    AuthenticationFailed,
    BrokerConnectionError,
    PermissionDenied,
    ScriptError,
    consumers,
)
from celery_msg.core import Binding, Broker, Lease
from celery_msg.snapshot import take

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from conftest import Server

    from celery_msg.testing import TLSFiles

NEWS = Exchange("news", type="fanout")


def _every_operation(conn: Connection) -> None:
    """Publish, consume, ack, requeue, dead-letter, basic_get, broadcast, purge, delete."""
    publish(conn, ["a", "b", "c", "d"], routing_key="work", priority=5)
    receiver = Receiver(conn, [direct_queue("work")], prefetch_count=1, ack=False)
    (a,) = receiver.receive(1)
    # Acked from another thread while the consumer waits for room: it is woken up.
    acker = threading.Timer(0.3, a.ack)
    acker.start()
    (b,) = receiver.receive(1)
    acker.join()
    b.reject(requeue=True)
    (b_again,) = receiver.receive(1)
    b_again.ack()
    (c,) = receiver.receive(1)
    c.reject(requeue=False)  # dead-lettered
    receiver.consumer.cancel()
    d = direct_queue("work")(conn.default_channel).get(no_ack=True)
    assert d is not None and d.headers["id"] == "d"

    archive = Queue("news.archive", NEWS)
    subscriber = Receiver(conn, [Queue("news.live", NEWS, auto_delete=True), archive])
    publish(conn, ["n1"], exchange=NEWS, routing_key="")
    assert sorted(ids_of(subscriber.receive(2))) == ["n1", "n1"]
    subscriber.nothing_for(0.5)  # a renewal round (leases, bindings)
    subscriber.consumer.cancel()

    jobs = Exchange("jobs", type="direct")
    scratch = Queue("scratch", jobs, routing_key="scratch")(conn.default_channel)
    scratch.declare()
    publish(conn, ["x1", "x2"], exchange=jobs, routing_key="scratch")
    assert scratch.purge() == 2
    scratch.delete()


def test_every_key_written_in_a_full_cycle_starts_with_the_key_prefix(
    fresh_server: Server, prefix: str
):
    with fresh_server.process.client() as admin:
        admin.config_set("notify-keyspace-events", "KEA")
        events = admin.pubsub()
        events.psubscribe("__keyevent@*__:*")
        assert events.get_message(timeout=5)["type"] == "psubscribe"
        with connect(fresh_server, prefix, **FAST) as conn:
            _every_operation(conn)

        written: set[str] = set()
        while (event := events.get_message(timeout=0.5)) is not None:
            written.add(event["data"].decode())
        events.close()
        stored = scan_keys(admin)
        databases = set(admin.info("keyspace"))

    assert written, "no keyspace events: the cycle wrote nothing?"
    assert {k for k in written | stored if not k.startswith(prefix)} == set()
    assert {
        f"{prefix}queues",
        f"{prefix}bindings:news",
        f"{prefix}{{work}}:dead",
        f"{prefix}{{news.live}}:ready",
    } <= written
    assert any(k.startswith(f"{prefix}wake:") for k in written)
    assert databases == {"db0"}


@pytest.fixture
def acl_server(server_factory: Callable[..., Server], prefix: str) -> Server:
    app = readme_acl(prefix, "app-pw")
    return server_factory(
        config=[
            app,
            app.replace("user celery ", "user intruder ", 1)
            .replace(">app-pw", ">intruder-pw")
            .replace(f"~{prefix}*", "~other:*"),
            app.replace("user celery ", "user nozpop ", 1)
            .replace(">app-pw", ">nozpop-pw")
            .replace(" +zpopmin", ""),
        ]
    )


def _as_user(server: Server, user: str, password: str, prefix: str) -> Connection:
    return Connection(
        f"celery-msg://{user}:{password}@127.0.0.1:{server.process.port}/0",
        transport_options={"key_prefix": prefix, **FAST},
    )


def _every_broker_call(broker: Broker, dead_letters: Any) -> None:
    """What the CLI, the look-up API and the consumers' sweeps do besides kombu's calls."""
    broker.publish("work", "w1", "{}", 0)
    broker.publish("work", "w2", "{}", 0, due_ms=int(time.time() * 1000) + 10)
    time.sleep(0.05)
    assert broker.promote("work") == 1
    [first, _] = broker.reserve(["work"], 2, "c9")
    assert broker.extend([Lease("work", first.key, first.token)]) == []
    assert broker.dead_letter(Lease("work", first.key, first.token), "rejected", "by hand")
    assert broker.lookup("w1")[0].state == "DEAD"
    assert broker.counts("work")["dead"] == 2  # w1, and c from the kombu cycle
    assert broker.stats("work")["published"] >= 2
    assert "work" in broker.queues() and broker.exists("work")
    dead = list(dead_letters.iter())
    assert dead_letters.get("w1").id == "w1"
    assert dead_letters.replay(dead) == 2
    assert dead_letters.trim({"work": (1, 1)}) == 0
    broker.bind("gone", Binding("", "", "gone.q"), ttl_ms=1)
    time.sleep(0.01)
    assert broker.table("gone").bindings == []  # expired: removed with its queue (WATCH)
    broker.reclaim("work")
    consumers.heartbeat(broker, "c9", ["work"], 10_000)  # a consumer's renewer, and metrics
    [work] = [q for q in take(broker).queues if q.queue == "work"]
    assert work.readable and work.consumers == 1 and work.counters["published"] >= 2
    consumers.detach(broker, "c9", ["work"])
    assert broker.purge("work") >= 1
    broker.delete("work")


def _denied(admin: redis.Redis, user: str) -> list[str]:
    """What ACL LOG says ``user`` was refused, but redis-py's CLIENT SETINFO (refused and
    ignored: the README leaves it out because Redis 7.0 does not know it)."""
    objects = [_text(e.get("object")) for e in admin.acl_log() if _text(e.get("username")) == user]
    return [o for o in objects if o != "client|setinfo"]


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def test_the_readme_acl_user_restricted_to_the_key_prefix_can_do_everything(
    acl_server: Server, prefix: str
):
    with _as_user(acl_server, "celery", "app-pw", prefix) as conn:
        _every_operation(conn)
        with acl_server.process.client() as admin:
            broker = Broker(admin, prefix=prefix)
            assert broker.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 1}
            assert broker.queues() == ["news.archive", "news.live", "work"]
        _every_broker_call(conn.transport.broker, conn.transport.dead_letters)
    with acl_server.process.client() as admin:
        denied = _denied(admin, "celery")
    assert denied == []


def test_a_celery_worker_runs_tasks_and_answers_remote_control_as_the_readme_acl_user(
    acl_server: Server, prefix: str, tmp_path: Path
):
    with stack_factory(acl_server.url, prefix, tmp_path) as make:
        stack = make(broker_user="celery", broker_password="app-pw")
        worker = stack.worker()
        results = [stack.task("add").delay(i, 1) for i in range(5)]
        assert [r.get(timeout=15) for r in results] == [1, 2, 3, 4, 5]
        inspect = stack.app.control.inspect(destination=[worker.nodename], timeout=5)
        assert inspect.ping() == {worker.nodename: {"ok": "pong"}}
        stack.app.control.shutdown(destination=[worker.nodename])
        assert worker.wait_exit(15) == 0
    with acl_server.process.client() as admin:
        denied = _denied(admin, "celery")
    assert denied == []


def test_an_acl_user_without_access_to_the_key_prefix_fails_with_an_error_that_says_so(
    acl_server: Server, prefix: str
):
    with _as_user(acl_server, "intruder", "intruder-pw", prefix) as conn:
        conn.ensure_connection(max_retries=0)  # authentication itself works
        with pytest.raises(PermissionDenied, match=r"(?i)no permissions") as raised:
            publish(conn, ["a"], routing_key="work")
        assert isinstance(raised.value, ScriptError)
        assert isinstance(raised.value, conn.channel_errors)
        assert "'work'" in str(raised.value)
        assert isinstance(raised.value.__cause__, redis.exceptions.NoPermissionError)


def test_an_acl_user_missing_a_command_gets_permission_denied_naming_it(
    acl_server: Server, prefix: str
):
    with _as_user(acl_server, "nozpop", "nozpop-pw", prefix) as conn:
        publish(conn, ["a"], routing_key="work")
        with pytest.raises(PermissionDenied, match=r"(?i)zpopmin") as raised:
            conn.transport.broker.reserve(["work"], 1, "c1")
        assert "see README, Security" in str(raised.value)


def test_a_wrong_password_fails_at_start_up_as_an_authentication_error(
    acl_server: Server, prefix: str
):
    conn = _as_user(acl_server, "celery", f"wrong-{uuid.uuid4().hex[:6]}", prefix)
    with pytest.raises(AuthenticationFailed, match=r"(?i)refused the credentials"):
        conn.transport.establish_connection()
    conn.release()


def test_celery_msgs_urls_speak_tls_and_verify_the_server_certificate(
    tls_server: Server, tls_files: TLSFiles, prefix: str
):
    conn = Connection(
        f"celery-msgs://127.0.0.1:{tls_server.process.port}/0",
        ssl={"ssl_ca_certs": str(tls_files.ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED},
        transport_options={"key_prefix": prefix},
    )
    with conn:
        publish(conn, ["secret"], routing_key="work")
        (message,) = Receiver(conn, [direct_queue("work")]).receive(1)
        assert message.payload == {"id": "secret"}
        pool = conn.transport.redis.connection_pool
        assert pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert pool.connection_class is redis.SSLConnection


def test_a_tls_server_whose_certificate_is_not_trusted_is_refused(tls_server: Server, prefix: str):
    conn = Connection(
        f"celery-msgs://127.0.0.1:{tls_server.process.port}/0",
        transport_options={"key_prefix": prefix},
    )
    with pytest.raises(OperationalError, match=r"(?i)certificate verify failed") as raised:
        conn.ensure_connection(max_retries=0)
    assert isinstance(raised.value.__cause__, BrokerConnectionError)


def test_messages_are_stored_as_json_with_the_json_serializer_by_default(
    server: Server, prefix: str, redis_client: redis.Redis
):
    with connect(server, prefix) as conn:
        conn.Producer().publish(
            {"text": "héllo", "n": [1, 2]}, routing_key="work", headers={"id": "j1"}
        )
        raw = redis_client.hget(f"{prefix}{{work}}:body", "j1")
        assert raw is not None
        envelope = json.loads(raw)  # the transport's own envelope is JSON
        assert envelope["content-type"] == "application/json"
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        assert json.loads(body) == {"text": "héllo", "n": [1, 2]}
        (message,) = Receiver(conn, [direct_queue("work")]).receive(1)
        assert message.content_type == "application/json"
        assert message.payload == {"text": "héllo", "n": [1, 2]}
