"""Poison: the one rule that ends a crash loop.

A message whose consumer dies (or whose handling raises) before it is settled comes back, and
would end the next consumer too. The rule: a message delivered ``max_deliveries`` times without
an ack is not delivered again; its next delivery dead-letters it with reason ``poison`` and the
detail :func:`detail` (or drops it, where the Celery layer's policy says so).

Two layers apply this rule, each where only it can:

* ``reserve.lua``, for the transport option ``max_deliveries``: at the fetch, atomically, so a
  plain kombu consumer never receives the message. It gets the limit in ARGV and the detail's
  wording (``POISON_DETAIL``) and the record's fields from the generated preamble.
* the Celery consumer (:mod:`celery_msg.app`), for a policy's ``max_deliveries`` (per task or
  queue): only it knows the task, can tell the result backend and honours
  ``DeadLetter(enabled=False)``. :func:`hand_to_policies` (called by ``configure``) moves the
  transport option into the default policy and sets the script's limit to 0, so in a Celery app
  the limit is applied once, by the Celery layer, with :func:`is_poison` (unless the default
  policy sets a limit of its own: then the transport keeps its option too, and the lower limit
  ends the loop first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .policy import Policies

#: The detail of a poison record, as Python and reserve.lua (the preamble's ``POISON_DETAIL``,
#: through ``string.format``) write it: ``%d`` is the deliveries made without an ack.
DETAIL_FORMAT = "delivered %d times without an ack"


def is_poison(delivered: int, limit: int) -> bool:
    """Whether a message delivered ``delivered`` times before (this delivery not counted) has
    reached ``limit`` (0: no limit): reserve.lua's test, the same numbers."""
    return limit > 0 and delivered >= limit


def detail(delivered: int) -> str:
    """The record's detail for a message delivered ``delivered`` times without an ack."""
    return DETAIL_FORMAT % delivered


def hand_to_policies(
    options: Mapping[str, Any], policies: Policies
) -> tuple[dict[str, Any], Policies]:
    """The transport option ``max_deliveries`` moved into the default policy (unless that sets
    its own) and the script's limit set to 0: the Celery layer applies it, as any policy, so the
    result backend learns of the poison message and ``DeadLetter(enabled=False)`` is honoured
    (the script could do neither)."""
    out = dict(options)
    limit = out.get("max_deliveries")
    if not limit or policies.default.max_deliveries is not None:
        return out, policies
    default = dataclasses.replace(policies.default, max_deliveries=limit)
    out["max_deliveries"] = 0
    return out, dataclasses.replace(policies, default=default)
