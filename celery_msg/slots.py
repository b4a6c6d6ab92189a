"""Redis Cluster: splitting work that spans queues into one piece per hash slot.

Why its own module: on one server a consumer reserves from all its queues in one script call;
on a Cluster each queue's keys live in the slot of its ``{queue}`` hash tag, and a script (or a
transaction, or a BLPOP) may only touch one slot. This module decides how a request over
several queues is cut into per-slot requests without changing what it means:

- ``strict`` order drains earlier queues first, so the queues are cut into *runs* of
  neighbours sharing a slot, and a later run is asked only for what the earlier ones left;
- ``fair`` order takes one message from each queue in turn, so the count is shared out over
  the queues as the round-robin would (beginning with ``queues[start]``), each slot asked for
  its queues' share in the same round trip; what a slot could not fill is asked of the others
  afterwards.

On a single server every function here returns the request unchanged: one call, as before.

The global keys (queue registry, exchanges, bindings and their versions, expiring queues) get
one hash tag of their own on a Cluster (:data:`GLOBAL_TAG`), so that the transactions over them
(bind, unbind, a binding table read at one version) stay in one slot.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from redis.cluster import RedisCluster
from redis.crc import key_slot

from .leases import ReserveRequest

#: The hash tag of the global keys on a Cluster: ``<prefix>{:global}:queues``. A queue named
#: ``:global`` shares their slot, which is harmless (its parts have other names).
GLOBAL_TAG = "{:global}:"


def is_cluster(client: Any) -> bool:
    """True for redis-py's cluster client (see :func:`celery_msg.connection.cluster_client`)."""
    return isinstance(client, RedisCluster)


def global_prefix(prefix: str, cluster: bool) -> str:
    """The prefix of the global keys: ``prefix`` on one server (names unchanged), with
    :data:`GLOBAL_TAG` appended on a Cluster."""
    return prefix + GLOBAL_TAG if cluster else prefix


def queue_slot(queue: str) -> int:
    """The hash slot of every key of ``queue`` (its ``{queue}`` hash tag)."""
    return int(key_slot(("{" + queue + "}").encode()))


def plan(
    request: ReserveRequest, cluster: bool
) -> tuple[list[ReserveRequest], list[ReserveRequest]]:
    """``request`` cut into per-slot requests: those sent at once, and those asked in order,
    one at a time, for what is still missing (each then asked for the shortfall)."""
    queues = request.queues
    if not cluster or len(queues) < 2:
        return [request], []
    slots = [queue_slot(q) for q in queues]
    if len(set(slots)) == 1:
        return [request], []
    if request.order == "strict":
        runs: list[list[str]] = []
        for i, queue in enumerate(queues):
            if i and slots[i] == slots[i - 1]:
                runs[-1].append(queue)
            else:
                runs.append([queue])
        subs = [replace(request, queues=run, start=0) for run in runs]
        return subs[:1], subs[1:]
    n = len(queues)
    rotation = [(request.start + i) % n for i in range(n)] if 0 <= request.start < n else range(n)
    share = [0] * n
    for taken in range(request.count):
        share[rotation[taken % n]] += 1
    groups: dict[int, list[int]] = {}
    for i in rotation:
        groups.setdefault(slots[i], []).append(i)
    first: list[ReserveRequest] = []
    followers: list[ReserveRequest] = []
    for members in groups.values():
        ordered = sorted(members)
        sub_queues = [queues[i] for i in ordered]
        start = ordered.index(members[0])
        count = sum(share[i] for i in members)
        sub = replace(request, queues=sub_queues, start=start, count=count)
        if count:
            first.append(sub)
        followers.append(sub)
    return first, followers
