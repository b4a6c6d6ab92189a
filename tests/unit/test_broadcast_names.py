"""Naming Celery's anonymous Broadcast queues after the worker (no Redis, no worker)."""

from __future__ import annotations

from celery import Celery
from kombu import Queue
from kombu.common import Broadcast

from celery_msg.broadcast import name_broadcast_queues, stable_name

NODE = "w1@host"


def _app() -> Celery:
    app = Celery("names", broker="celery-msg://127.0.0.1:1/0", set_as_current=False)
    app.conf.task_queues = (
        Queue("celery"),
        Broadcast("cache"),
        Broadcast("config", queue="mine"),
    )
    return app


def test_an_anonymous_broadcast_queue_is_named_after_its_exchange_and_node():
    queues = _app().amqp.queues
    anonymous = queues["cache"].name
    assert anonymous.startswith("bcast.")

    assert name_broadcast_queues(queues, NODE) == {anonymous: "cache.w1@host.bcast"}
    assert stable_name("cache", NODE) == "cache.w1@host.bcast"
    named = queues["cache"]  # the alias (the exchange name) still finds it
    assert named.name == "cache.w1@host.bcast"
    assert isinstance(named, Broadcast)
    assert (named.exchange.name, named.exchange.type, named.auto_delete) == (
        "cache",
        "fanout",
        True,
    )
    assert anonymous not in queues
    assert sorted(queues.consume_from) == ["cache.w1@host.bcast", "celery", "mine"]


def test_a_broadcast_queue_with_a_name_of_its_own_keeps_it():
    queues = _app().amqp.queues
    name_broadcast_queues(queues, NODE)
    assert queues["mine"].name == "mine"
    assert queues["config"] is queues["mine"]


def test_queues_selected_with_dash_q_by_alias_follow_the_rename():
    queues = _app().amqp.queues
    queues.select(["celery", "cache"])
    name_broadcast_queues(queues, NODE)
    assert sorted(queues.consume_from) == ["cache.w1@host.bcast", "celery"]
    # add_consumer (Celery's select_add) still adds to the selection
    queues.select_add("extra")
    assert sorted(queues.consume_from) == ["cache.w1@host.bcast", "celery", "extra"]


def test_naming_twice_changes_nothing_more():
    queues = _app().amqp.queues
    name_broadcast_queues(queues, NODE)
    assert name_broadcast_queues(queues, NODE) == {}
