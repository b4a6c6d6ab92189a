"""Redis Cluster (issue 11): ``celery-msg+cluster://`` URLs, and how a reserve over queues on
several slots is cut into per-slot requests; no server needed."""

from __future__ import annotations

import pytest
from kombu import Connection

import celery_msg  # noqa: F401  (registers the URL schemes)
from celery_msg.connection import cluster_address
from celery_msg.errors import ConfigurationError
from celery_msg.leases import ReserveRequest
from celery_msg.slots import GLOBAL_TAG, global_prefix, plan, queue_slot

URL = "celery-msg+cluster://al:s%40c@h1:7000/0;celery-msg+cluster://h2:7001;celery-msg+cluster://h3"


def test_a_cluster_url_lists_its_nodes_and_the_credentials_of_the_data_nodes():
    address = cluster_address(Connection(URL))
    assert address is not None
    assert address.nodes == (("h1", 7000), ("h2", 7001), ("h3", 6379))
    assert (address.data.userid, address.data.password) == ("al", "s@c")


def test_the_form_kombu_switches_to_on_failover_reads_the_same_nodes():
    conn = Connection(URL)
    conn.switch(conn.alt[1])
    assert conn.transport_cls == "celery-msg+cluster"
    address = cluster_address(conn)
    assert address is not None
    assert address.nodes == (("h1", 7000), ("h2", 7001), ("h3", 6379))
    assert address.data.password == "s@c"


def test_commas_inside_one_part_are_nodes_too():
    address = cluster_address(Connection("celery-msg+cluster://h1:7000,h2:7001"))
    assert address is not None
    assert address.nodes == (("h1", 7000), ("h2", 7001))


def test_a_plain_url_is_not_a_cluster_url():
    assert cluster_address(Connection("celery-msg://h1:7000/0")) is None


@pytest.mark.parametrize("url", ["celery-msg+cluster://h1:7000/3", "celery-msg+cluster://h1/x"])
def test_a_database_other_than_0_is_refused_as_cluster_has_no_select(url):
    with pytest.raises(ConfigurationError, match="database"):
        cluster_address(Connection(url))


def test_a_bad_node_is_refused_by_name():
    with pytest.raises(ConfigurationError, match="'h2:port'"):
        cluster_address(Connection("celery-msg+cluster://h1:7000,h2:port"))


def test_global_keys_get_one_hash_tag_only_on_a_cluster():
    assert global_prefix("app:", cluster=False) == "app:"
    assert global_prefix("app:", cluster=True) == "app:" + GLOBAL_TAG


# Three queues in three different slots, and one sharing a's slot (found once, below).
A, B, C = "a", "b", "c"
SAME_AS_A = next(f"a{i}" for i in range(100_000) if queue_slot(f"a{i}") == queue_slot("a"))


def test_on_one_server_a_request_is_never_cut():
    request = ReserveRequest([A, B, C], 6, "me")
    assert plan(request, cluster=False) == ([request], [])


def test_queues_of_one_slot_stay_one_call():
    request = ReserveRequest([A, SAME_AS_A], 6, "me")
    assert plan(request, cluster=True) == ([request], [])


def test_strict_order_asks_a_later_slot_only_for_what_the_earlier_left():
    """Strict across slots a, b, a': drained as a, then b, then a' (not a with a')."""
    first, followers = plan(ReserveRequest([A, B, SAME_AS_A], 5, "me", "strict"), cluster=True)
    assert [r.queues for r in first] == [[A]]
    assert [r.queues for r in followers] == [[B], [SAME_AS_A]]
    assert all(r.count == 5 and r.order == "strict" for r in first + followers)


def test_fair_order_shares_the_count_as_the_round_robin_would():
    first, followers = plan(ReserveRequest([A, B, C, SAME_AS_A], 6, "me", start=1), cluster=True)
    # Round robin from b: b, c, a', a, b, c -> b 2, c 2, a and a' 1 each (one slot: 2).
    counts = {tuple(r.queues): r.count for r in first}
    assert counts == {(B,): 2, (C,): 2, (A, SAME_AS_A): 2}
    same_slot = next(r for r in first if r.queues == [A, SAME_AS_A])
    assert same_slot.start == 1  # a' comes before a in the rotation that starts at b
    assert sorted(map(tuple, (r.queues for r in followers))) == [(A, SAME_AS_A), (B,), (C,)]


def test_fair_order_with_fewer_messages_than_queues_asks_only_the_first_in_turn():
    first, _ = plan(ReserveRequest([A, B, C], 1, "me", start=2), cluster=True)
    assert [(r.queues, r.count) for r in first] == [([C], 1)]
