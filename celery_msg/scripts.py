"""Loads the Lua scripts (one ``.lua`` file per state transition) once per Redis client.

Each script starts with a generated preamble that hands it the key layout, the return codes
defined here, the counters and reasons, the dead-letter record's fields and the poison detail,
so Python and Lua never drift; ``--@include name.lua`` lines pull in shared helpers
(Redis has no include of its own). :mod:`celery_msg.transitions` registers each with
``register_script`` (redis-py calls EVALSHA and loads the script again after a server restart or
SCRIPT FLUSH) behind one typed wrapper per script.
"""

from __future__ import annotations

import enum
import hashlib
import re
from functools import cache
from importlib import resources

from .counters import REASON_MAX
from .keys import KEY_TYPES, PUBLISH_KEY_PARTS, QUEUE_KEY_PARTS, Counter, Reason, RecordField
from .poison import DETAIL_FORMAT as POISON_DETAIL
from .queueargs import MAX_LENGTH, MAX_MS, QueueArg

SCRIPT_NAMES: tuple[str, ...] = (
    "publish",
    "reserve",
    "ack",
    "extend",
    "requeue",
    "dead_letter",
    "reclaim",
    "purge",
    "promote",
    "bury",
    "replay",
    "discard",
    "trim_dead",
    "unlock",
    "oldest",
)

#: Ready-score layout (see celery_msg/lua/_queue.lua): a priority band is BAND wide, and MID
#: separates the front of a band (requeued, reclaimed: at their publish sequence number) from its
#: back (published, at theirs).
BAND = 2**44
MID = 2**43

#: Most expired messages one publish removes from a queue with a message TTL: more than one, so
#: that a queue nobody consumes shrinks back to about rate x TTL, and few, so a publish stays
#: cheap after a long pause.
EXPIRE_BATCH = 10
#: Most messages one publish drops from the head of a queue over its ``max_length`` (more than
#: one only after ``max_length`` was lowered).
TRIM_BATCH = 100

#: The resolution of a queue's clock (ms; see celery_msg/lua/_queue.lua): a publish writes a
#: tick (its sequence number -> now) when the last is at least this old, and a message at the
#: back of its band is given the time of the last tick at or before its sequence number, so the
#: oldest-ready age over-reports by less than this. One tick per second of publishing: a backlog
#: of an hour holds at most 3,600, against one ``born`` entry per message before.
CLOCK_MS = 1000

#: The group reserve.lua gives a ready id whose body was gone (it is dead as 'missing-body').
MISSING_BODY_GROUP = -1

_INCLUDE = re.compile(r"^--@include (\S+)$", re.MULTILINE)


class Code(enum.IntEnum):
    """Per-message result codes returned by the scripts."""

    LEASE_LOST = 0
    OK = 1
    NOT_FOUND = 2
    #: publish.lua: the exchange's bindings changed since the caller read them; nothing stored.
    STALE_ROUTE = 3
    #: ack.lua, extend.lua: the message is no longer stored in the queue (acked already, e.g. by
    #: the prefork pool child that ran it; or purged): nothing to settle, and nobody else holds
    #: it, so it is no lost lease.
    GONE = 4


def _read(name: str) -> str:
    return resources.files("celery_msg").joinpath("lua", name).read_text(encoding="utf-8")


def _lua_list(names: tuple[str, ...]) -> str:
    return "{" + ", ".join(f"'{name}'" for name in names) + "}"


def _lua_map(mapping: dict[str, str]) -> str:
    return "{" + ", ".join(f"{key} = '{value}'" for key, value in mapping.items()) + "}"


def _preamble(shard_signal: bool) -> str:
    codes = "\n".join(f"local {code.name} = {code.value}" for code in Code)
    stats = "\n".join(f"local STAT_{c.name} = '{c.value}'" for c in Counter)
    reasons = "\n".join(
        f"local REASON_{r.name} = '{r.value}'" for r in (Reason.POISON, Reason.MISSING_BODY)
    )
    fields = "\n".join(f"local RECORD_{f.name} = '{f.value}'" for f in RecordField)
    return (
        f"local NK = {len(QUEUE_KEY_PARTS)}\n"
        f"local PARTS = {_lua_list(QUEUE_KEY_PARTS)}\n"
        f"local PUBLISH_PARTS = {_lua_list(PUBLISH_KEY_PARTS)}\n"
        f"local KIND = {_lua_map(KEY_TYPES)}\n"
        f"{codes}\n{stats}\n{reasons}\n{fields}\n"
        f"local POISON_DETAIL = '{POISON_DETAIL}'\n"
        f"local BAND = {BAND}\nlocal MID = {MID}\nlocal MISSING = {MISSING_BODY_GROUP}\n"
        f"local EXPIRE_BATCH = {EXPIRE_BATCH}\nlocal TRIM_BATCH = {TRIM_BATCH}\n"
        f"local CLOCK_MS = {CLOCK_MS}\n"
        f"local ARG_MESSAGE_TTL = '{QueueArg.MESSAGE_TTL}'\n"
        f"local ARG_MAX_LENGTH = '{QueueArg.MAX_LENGTH}'\n"
        f"local ARG_MAX = {max(MAX_MS, MAX_LENGTH)}\n"
        f"local REASON_MAX = {REASON_MAX}\n"
        f"local SHARD_SIGNAL = {'true' if shard_signal else 'false'}\n"
    )


@cache
def source(name: str, *, shard_signal: bool = False) -> str:
    """The full text sent to Redis for script ``name``: preamble, includes expanded.

    ``shard_signal`` (on a Redis Cluster): a queue's wake-up marker is a sharded pub/sub
    message (``SPUBLISH`` on the channel named like its ``signal`` key, so in its slot) instead
    of the marker list, since a consumer cannot BLPOP keys of several slots at once but can
    listen to the channels of all of them (:mod:`celery_msg.shardwait`)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no such script: {name}")
    body = _INCLUDE.sub(lambda m: _read(m.group(1)), _read(f"{name}.lua"))
    return _preamble(shard_signal) + body


@cache
def _names_by_sha() -> dict[str, str]:
    return {
        hashlib.sha1(source(n, shard_signal=shard).encode()).hexdigest(): n
        for n in SCRIPT_NAMES
        for shard in (False, True)
    }


_WHERE = re.compile(r"script: ([0-9a-f]{40}), on @user_script:(\d+)")


def where(error: str) -> str | None:
    """ "<script>.lua line N: <the Lua line>" for a Redis error raised inside one of our scripts
    (Redis names the script by SHA1 and the line of the text sent), or None."""
    match = _WHERE.search(error)
    if match is None:
        return None
    name = _names_by_sha().get(match.group(1))
    if name is None:
        return None
    lines = source(name).splitlines()
    number = int(match.group(2))
    text = lines[number - 1].strip() if 0 < number <= len(lines) else "?"
    return f"{name}.lua (as sent) line {number}: {text}"
