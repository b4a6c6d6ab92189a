"""The poison rule in one place (celery_msg.poison): the Celery layer's test and the hand-over
of the transport option to the policies (reserve.lua's side: tests/lua/test_reserve.py)."""

from __future__ import annotations

from celery_msg import poison
from celery_msg.policy import Policies, Policy
from celery_msg.scripts import source


def test_a_message_is_poison_once_delivered_limit_times_and_never_without_a_limit():
    assert [poison.is_poison(n, 2) for n in range(4)] == [False, False, True, True]
    assert not poison.is_poison(10_000, 0)


def test_the_detail_names_the_deliveries_and_reaches_the_scripts_through_the_preamble():
    assert poison.detail(3) == "delivered 3 times without an ack"
    assert f"local POISON_DETAIL = '{poison.DETAIL_FORMAT}'\n" in source("reserve")


def test_the_transport_limit_moves_into_the_default_policy_and_the_script_limit_becomes_zero():
    options, policies = poison.hand_to_policies({"max_deliveries": 3, "x": 1}, Policies())

    assert options == {"max_deliveries": 0, "x": 1}
    assert policies.default.max_deliveries == 3


def test_a_default_policy_with_its_own_limit_keeps_it_and_the_transport_keeps_its_own():
    mine = Policies(default=Policy(max_deliveries=5))

    assert poison.hand_to_policies({"max_deliveries": 3}, mine) == ({"max_deliveries": 3}, mine)
    assert poison.hand_to_policies({}, Policies()) == ({}, Policies())
