"""``python -m bench.commands``: Redis commands the scripts run per message, by script.

Why: on a shared machine a rate or a server CPU figure moves by a fifth between runs, so a
change of one command per message does not show in them. The number of commands a script runs
inside Redis does not depend on the load: ``INFO commandstats`` counts the commands called from
Lua too. This publishes N messages (36-character ids, 800 B payloads, 5 per ms), reserves them
in batches of 100 and acks them, through the scripts' own wrappers, against a fresh server, and
prints the commands per message of each phase (the ``TYPE`` key checks included).

Compare two checkouts by running it from each (``python -m`` imports the ``celery_msg`` of the
current directory).
"""

from __future__ import annotations

import argparse
import sys

import redis

from celery_msg import transitions as tr
from celery_msg.keys import QueueKeys
from celery_msg.testing import ServerProcess

#: Reserve and ack batch size (the raw group's prefetch).
BATCH = 100
#: The commands the measurement itself sends, not a script.
_OWN = {"evalsha", "info", "config", "script"}


def _calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT``, scripts' own commands only."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in _OWN
    }


def measure(n: int) -> dict[str, dict[str, int]]:
    """Commands run by publish, reserve and ack for ``n`` messages, by phase and command."""
    out: dict[str, dict[str, int]] = {}
    with ServerProcess() as server:
        client = redis.Redis(port=server.port)
        scripts = tr.Scripts(client)
        keys = QueueKeys("q", "bench:")
        now = 1_764_500_000_000
        client.config_resetstat()
        for i in range(n):
            args = tr.Publish.args(
                message_id=f"{i:036d}",
                payload="x" * 800,
                band=0,
                due_ms=0,
                unique=False,
                route_version=tr.UNROUTED,
                now_ms=now + i // 5,
                lock_until_ms=0,
                retry=False,
            )
            scripts.publish.run(keys.publish, args)
        out["publish"] = _calls(client)
        client.config_resetstat()
        held: list[tuple[str, int]] = []
        for _ in range(n // BATCH):
            args = tr.Reserve.args(
                now_ms=now + n,
                lease_ms=60_000,
                count=BATCH,
                consumer="c",
                order="fair",
                start=0,
                reclaim_batch=100,
                max_deliveries=0,
            )
            reply = scripts.reserve.run(keys.all, args)
            held.extend((m.key, m.token) for m in reply.messages)
        out["reserve"] = _calls(client)
        client.config_resetstat()
        for start in range(0, len(held), BATCH):
            scripts.ack.run(keys.all, tr.Ack.args(held[start : start + BATCH]))
        out["ack"] = _calls(client)
        client.close()
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__)
    parser.add_argument("--n", type=int, default=5_000, help="messages (default 5000)")
    n = parser.parse_args(argv).n
    for phase, calls in measure(n).items():
        per = {name: count / n for name, count in sorted(calls.items()) if count / n >= 0.005}
        detail = ", ".join(f"{name} {value:.2f}" for name, value in per.items())
        print(f"{phase}: {sum(calls.values()) / n:.2f} commands per message ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
