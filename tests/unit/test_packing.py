"""The publisher's hand-packed EVALSHA is byte for byte what redis-py would send."""

from __future__ import annotations

import pytest
import redis
from redis.commands.core import Script

from celery_msg.keys import PUBLISH_KEY_PARTS, QueueKeys
from celery_msg.redisio import pack_evalsha, pack_head


def _redis_py_packing(*args: object) -> bytes:
    connection = redis.Connection()  # never connected: packing needs no server
    return b"".join(connection.pack_command(*args))


@pytest.mark.parametrize(
    "args",
    [
        ("id-1", b'{"body": "x"}', 0, 0, 0),
        ("t\u00e9l\u00e9charger/3", "caf\u00e9 \u2615", 255, 1795715826113, 1),
        ("", b"", 7, 0, 0),
    ],
)
def test_a_packed_publish_equals_redis_pys_packing(args: tuple[object, ...]):
    script = Script(redis.Redis(), "return 1")
    keys = QueueKeys("q{x}", "app:").publish

    packed = pack_evalsha(script, keys, args)

    assert packed == _redis_py_packing("EVALSHA", script.sha, len(keys), *keys, *args)
    assert packed.startswith(pack_head(script, keys, len(args)))


def test_publish_gets_only_the_keys_it_touches_in_its_order():
    keys = QueueKeys("q", "app:")

    assert keys.publish == tuple(f"app:{{q}}:{part}" for part in PUBLISH_KEY_PARTS)
    assert set(keys.publish) < set(keys.all)
