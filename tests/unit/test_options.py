"""TransportOptions: unknown names and bad values are rejected, naming the option."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from celery_msg.errors import ConfigurationError
from celery_msg.options import KOMBU_GENERIC, TransportOptions
from celery_msg.options import SECONDS as CONVERTED_TO_FLOAT

#: Options given in seconds (annotated float): public times, as in Celery.
SECONDS = [
    f.name
    for f in dataclasses.fields(TransportOptions)
    if float in typing.get_args(typing.get_type_hints(TransportOptions)[f.name])
    or typing.get_type_hints(TransportOptions)[f.name] is float
]
#: Options that count things (annotated int).
INTEGERS = [name for name, hint in typing.get_type_hints(TransportOptions).items() if hint is int]


def test_the_defaults_are_valid():
    options = TransportOptions()

    assert options == TransportOptions.from_mapping({})
    assert options.lease_ms == 10_000


def test_the_option_lists_cover_what_this_module_checks():
    assert set(SECONDS) == {
        "lease_timeout",
        "sweep_interval",
        "binding_ttl",
        "binding_cache_ttl",
        "socket_timeout",
        "socket_connect_timeout",
        "health_check_interval",
        "min_replicas_timeout",
    }
    assert set(INTEGERS) == {
        "default_priority",
        "fetch_batch",
        "reclaim_batch",
        "max_deliveries",
        "min_other_sentinels",
        "min_replicas",
    }
    assert set(CONVERTED_TO_FLOAT) == set(SECONDS)


def test_an_unknown_option_is_rejected_and_named():
    with pytest.raises(ConfigurationError, match="lease_timout"):
        TransportOptions.from_mapping({"lease_timout": 5})


def test_every_unknown_option_is_named_at_once():
    with pytest.raises(ConfigurationError) as excinfo:
        TransportOptions.from_mapping({"zzz": 1, "lease_timeout": 5, "aaa": 2})

    assert "aaa, zzz" in str(excinfo.value)
    assert "lease_timeout" not in str(excinfo.value).split(";")[0]


def test_a_configuration_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        TransportOptions.from_mapping({"nope": 1})


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5])
def test_a_zero_or_negative_lease_timeout_is_rejected(value: float):
    with pytest.raises(ConfigurationError, match="lease_timeout"):
        TransportOptions.from_mapping({"lease_timeout": value})


def test_a_lease_timeout_that_rounds_to_zero_milliseconds_is_rejected():
    # lease_ms would be 0: every delivery would be reclaimable the moment it is made.
    with pytest.raises(ConfigurationError, match="lease_timeout"):
        TransportOptions.from_mapping({"lease_timeout": 0.0004})


@pytest.mark.parametrize("value", [0.0004, 0.0005, 1e-9])
def test_a_lease_timeout_below_one_millisecond_is_rejected(value: float):
    with pytest.raises(ConfigurationError, match=r"lease_timeout: must be at least 0\.001 seconds"):
        TransportOptions.from_mapping({"lease_timeout": value})


def test_a_lease_timeout_of_one_millisecond_is_accepted():
    assert TransportOptions.from_mapping({"lease_timeout": 0.001}).lease_ms == 1


def _refused(name: str, value: object) -> None:
    """``{name: value}`` is refused with an error that names the option."""
    with pytest.raises(ConfigurationError, match=name):
        TransportOptions.from_mapping({name: value})


@pytest.mark.parametrize("name", ["lease_timeout", "sweep_interval", "binding_ttl"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_positive_times_reject_zero_and_negatives(name: str, value: float):
    _refused(name, value)


@pytest.mark.parametrize("name", ["binding_cache_ttl", "health_check_interval"])
def test_times_that_may_be_zero_accept_zero_and_reject_negatives(name: str):
    assert getattr(TransportOptions.from_mapping({name: 0}), name) == 0
    _refused(name, -0.1)


def test_socket_timeout_may_be_none_but_not_zero():
    assert TransportOptions.from_mapping({"socket_timeout": None}).socket_timeout is None
    with pytest.raises(ConfigurationError, match="socket_timeout"):
        TransportOptions.from_mapping({"socket_timeout": 0})


@pytest.mark.parametrize("name", sorted(SECONDS))
@pytest.mark.parametrize("value", [True, "10", [1]])
def test_a_time_option_rejects_bools_and_non_numbers(name: str, value: object):
    _refused(name, value)


@pytest.mark.parametrize("name", sorted(INTEGERS))
@pytest.mark.parametrize("value", [True, False, 2.5, "3", None])
def test_an_integer_option_rejects_bools_floats_and_strings(name: str, value: object):
    _refused(name, value)


@pytest.mark.parametrize("name", ["fetch_batch", "reclaim_batch"])
def test_batch_sizes_must_be_at_least_one(name: str):
    assert getattr(TransportOptions.from_mapping({name: 1}), name) == 1
    _refused(name, 0)


def test_max_deliveries_accepts_zero_for_unlimited_and_rejects_negatives():
    assert TransportOptions.from_mapping({"max_deliveries": 0}).max_deliveries == 0
    with pytest.raises(ConfigurationError, match="max_deliveries"):
        TransportOptions.from_mapping({"max_deliveries": -1})


@pytest.mark.parametrize("value", [-1, 256])
def test_default_priority_must_be_a_band_between_0_and_255(value: int):
    assert TransportOptions.from_mapping({"default_priority": 255}).default_priority == 255
    with pytest.raises(ConfigurationError, match="default_priority"):
        TransportOptions.from_mapping({"default_priority": value})


@pytest.mark.parametrize("value", ["round-robin", "FAIR", "", None])
def test_a_bad_queue_order_is_rejected(value: object):
    with pytest.raises(ConfigurationError, match="queue_order"):
        TransportOptions.from_mapping({"queue_order": value})


@pytest.mark.parametrize("value", ["strict", "fair"])
def test_both_queue_orders_are_accepted(value: str):
    assert TransportOptions.from_mapping({"queue_order": value}).queue_order == value


def test_a_bad_priority_order_is_rejected():
    with pytest.raises(ConfigurationError, match="priority_order"):
        TransportOptions.from_mapping({"priority_order": "descending"})


@pytest.mark.parametrize("value", ["app{1}:", "{app}", "app}", "app{"])
def test_a_key_prefix_with_braces_is_rejected(value: str):
    with pytest.raises(ConfigurationError, match="key_prefix"):
        TransportOptions.from_mapping({"key_prefix": value})


@pytest.mark.parametrize("value", ["", None, 5])
def test_a_key_prefix_must_be_a_non_empty_string(value: object):
    with pytest.raises(ConfigurationError, match="key_prefix"):
        TransportOptions.from_mapping({"key_prefix": value})


def test_kombus_generic_connection_options_are_accepted_silently(
    recwarn: pytest.WarningsRecorder,
):
    options = TransportOptions.from_mapping({**{n: 1 for n in KOMBU_GENERIC}, "lease_timeout": 5})

    assert options == TransportOptions(lease_timeout=5.0)
    assert not recwarn.list


@pytest.mark.parametrize("name", sorted(SECONDS))
def test_int_seconds_become_floats(name: str):
    options = TransportOptions.from_mapping({name: 7})

    value = getattr(options, name)
    assert value == 7.0
    assert type(value) is float


def test_lease_ms_is_the_lease_timeout_in_whole_milliseconds():
    assert TransportOptions.from_mapping({"lease_timeout": 2.5}).lease_ms == 2500
    assert TransportOptions.from_mapping({"lease_timeout": 1}).lease_ms == 1000


@pytest.mark.parametrize(("seconds", "ms"), [(1.001, 1001), (0.29, 290), (4.35, 4350)])
def test_lease_ms_rounds_to_the_nearest_millisecond_rather_than_truncating(seconds: float, ms: int):
    # 1.001 * 1000 == 1000.9999999999999 as a double: truncating would lose a millisecond.
    assert TransportOptions.from_mapping({"lease_timeout": seconds}).lease_ms == ms


def test_options_are_frozen_and_replace_validates():
    options = TransportOptions()

    with pytest.raises(dataclasses.FrozenInstanceError):
        options.lease_timeout = 1.0  # type: ignore[misc]
    assert options.replace(lease_timeout=3.0).lease_timeout == 3.0
    with pytest.raises(ConfigurationError, match="lease_timeout"):
        options.replace(lease_timeout=0)
