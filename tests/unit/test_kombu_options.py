"""A config written for kombu's ``redis://`` transport still starts on celery-msg: each option
kombu's redis transport knows is honoured (connection options, ``global_keyprefix``) or
accepted with one warning naming it. The list comes from kombu at test time, so an option a new
kombu adds fails here until it is sorted into one of the two."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis

from celery_msg.connection import BrokerAddress, redis_params
from celery_msg.options import IgnoredOptionWarning, TransportOptions


def kombu_redis_options() -> list[str]:
    """Every transport option kombu's redis transport reads or documents."""
    names = set(kombu_redis.SentinelChannel.from_transport_options)
    names |= set(kombu_redis.Channel.from_transport_options)
    section = (kombu_redis.__doc__ or "").split("Transport Options", 1)[1].split("Queue Arg", 1)[0]
    names |= set(re.findall(r"^\* ``(\w+)``", section, re.MULTILINE))
    names.add("polling_interval")  # kombu's virtual Transport reads it from transport options
    return sorted(names)


Params = dict[str, Any]
#: Options celery-msg honours: a value to set and how to see it applied.
HONOURED: dict[str, tuple[Any, Callable[[TransportOptions, Params], bool]]] = {
    "global_keyprefix": ("app-a:", lambda o, p: o.key_prefix == "app-a:"),
    "socket_timeout": (3.0, lambda o, p: p["socket_timeout"] == 3.0),
    "socket_connect_timeout": (2.0, lambda o, p: p["socket_connect_timeout"] == 2.0),
    "socket_keepalive": (False, lambda o, p: p["socket_keepalive"] is False),
    "socket_keepalive_options": ({4: 30}, lambda o, p: p["socket_keepalive_options"] == {4: 30}),
    "max_connections": (7, lambda o, p: p["max_connections"] == 7),
    "health_check_interval": (5, lambda o, p: p["health_check_interval"] == 5.0),
    "client_name": ("billing", lambda o, p: p["client_name"] == "billing"),
    "max_retries": (3, lambda o, p: True),  # read by kombu.Connection itself
    # Sentinel (applied when the URL is a celery-msg+sentinel:// one: test_sentinel_urls.py).
    "master_name": ("mymaster", lambda o, p: o.master_name == "mymaster"),
    "min_other_sentinels": (1, lambda o, p: o.min_other_sentinels == 1),
    "sentinel_kwargs": ({"password": "x"}, lambda o, p: o.sentinel_kwargs == {"password": "x"}),
}


def build(options: dict[str, Any]) -> tuple[TransportOptions, Params, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = TransportOptions.from_mapping(options)
    texts = [str(w.message) for w in caught if issubclass(w.category, IgnoredOptionWarning)]
    return built, redis_params(BrokerAddress(scheme="celery-msg"), built), texts


def test_kombus_option_list_is_read_from_kombu_and_not_empty():
    names = kombu_redis_options()

    assert {"visibility_timeout", "global_keyprefix", "retry_on_timeout"} <= set(names)
    assert len(names) >= 25


@pytest.mark.parametrize("name", kombu_redis_options())
def test_each_option_of_kombus_redis_transport_is_honoured_or_warned_about(name: str):
    value, applied = HONOURED.get(name, (1, None))

    options, params, warned = build({name: value})

    if applied is not None:
        assert applied(options, params), f"{name}={value!r} was accepted but not applied"
        assert warned == []
    else:
        assert len(warned) == 1, warned
        assert repr(name) in warned[0]
        assert "ignored by celery-msg: " in warned[0]


def test_a_whole_kombu_redis_config_starts_with_one_warning_per_ignored_option():
    config = {name: HONOURED.get(name, (1, None))[0] for name in kombu_redis_options()}

    options, _, warned = build(config)

    assert options.key_prefix == "app-a:"
    assert len(warned) == len(set(config) - set(HONOURED))


def test_global_keyprefix_keeps_two_apps_apart_as_kombu_does():
    a, _, _ = build({"global_keyprefix": "app-a:"})
    b, _, _ = build({"global_keyprefix": "app-b:"})

    assert (a.key_prefix, b.key_prefix) == ("app-a:", "app-b:")


def test_key_prefix_wins_over_a_different_global_keyprefix_with_a_warning():
    options, _, warned = build({"key_prefix": "ours:", "global_keyprefix": "theirs:"})

    assert options.key_prefix == "ours:"
    assert len(warned) == 1
    assert "key_prefix wins" in warned[0]


def test_the_same_key_prefix_and_global_keyprefix_say_nothing():
    options, _, warned = build({"key_prefix": "ours:", "global_keyprefix": "ours:"})

    assert options.key_prefix == "ours:"
    assert warned == []


def test_socket_connect_timeout_defaults_to_socket_timeout():
    _, params, _ = build({"socket_timeout": 4})

    assert params["socket_connect_timeout"] == 4.0
    assert "max_connections" not in params


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_connections", 0),
        ("max_connections", "10"),
        ("socket_keepalive", "yes"),
        ("socket_connect_timeout", 0),
        ("client_name", "has space"),
        ("socket_keepalive_options", [1, 2]),
    ],
)
def test_a_bad_connection_option_is_rejected_naming_it(name: str, value: object):
    from celery_msg.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=name):
        TransportOptions.from_mapping({name: value})
