"""The demo's closing checks: one function per scenario, each saying what it shows, then a table.

The demo exits 0 only if every check holds; a check is a name, the value seen and whether it is
what reliable delivery promises (nothing lost, nothing run twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from celery_msg.headers import epoch_ms

from .run import Run


class Check(NamedTuple):
    name: str
    value: str
    ok: bool


def checks(run: Run, outbox: Path, lease: float) -> list[Check]:
    """Every check of a run, in the order the scenario played them."""
    return [
        *_everything_finished(run, outbox),
        *_killed_worker_recovered(run, lease),
        *_retried_then_delivered(run),
        *_dead_lettered_then_replayed(run),
        *_scheduled_and_broadcast(run),
    ]


def report(console: Console, found: list[Check]) -> int:
    """Print the summary table and the verdict; the demo's exit code."""
    table = Table(title="summary")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_column("")
    for name, value, ok in found:
        table.add_row(name, value, "[green]ok[/]" if ok else "[bold red]FAILED[/]")
    console.print()
    console.print(table)
    ok = all(check.ok for check in found)
    console.print(
        "[bold green]OK[/]: nothing lost, nothing ran twice" if ok else "[bold red]FAILED[/]"
    )
    return 0 if ok else 1


def _everything_finished(run: Run, outbox: Path) -> list[Check]:
    finished = sum(run.state(t) == "SUCCESS" for t in run.sent)
    files = len(list(outbox.glob("*.eml")))
    first, again = run.duplicate_signup
    return [
        Check("tasks finished", f"{finished} of {len(run.sent)}", finished == len(run.sent)),
        Check("welcome emails written (one per user)", str(files), files == len(run.ids("email"))),
        Check(
            "double-submitted signup enqueued once",
            "same task id" if first == again else "two ids",
            first == again,
        ),
    ]


def _killed_worker_recovered(run: Run, lease: float) -> list[Check]:
    recovered = [
        t for t in run.killed_holding if run.result(t).get("worker", "").startswith("demo-b@")
    ]
    found = [
        Check(
            "reports held by the killed worker, finished on worker B",
            f"{len(recovered)} of {len(run.killed_holding)}",
            len(recovered) == len(run.killed_holding) > 0,
        )
    ]
    killed_at = run.killed_at or 0.0
    back = [run.result(t).get("started_at", 0) - killed_at for t in recovered]
    if back:
        # A dead worker's messages come back when their lease expires and a live consumer
        # fetches: here worker B, which starts after the kill (slower on a loaded machine).
        b_up = run.consuming.get("demo-b", killed_at) - killed_at
        found.append(
            Check(
                "... started again after the kill within",
                f"{max(back):.1f}s (lease {lease:.0f}s, worker B up after {b_up:.1f}s)",
                max(back) <= max(lease, b_up) + 2.0,
            )
        )
    once = [t for t in run.ids("report") if t not in run.killed_holding]
    found.append(
        Check(
            "reports longer than the lease, not killed: started once",
            f"{sum(run.result(t).get('starts') == 1 for t in once)} of {len(once)}",
            all(run.result(t).get("starts") == 1 for t in once),
        )
    )
    return found


def _retried_then_delivered(run: Run) -> list[Check]:
    hooks = [run.result(t).get("retries") for t in run.ids("webhook")]
    return [
        Check(
            "webhook: retried with backoff, then delivered",
            "; ".join(f"delivered after {n} retries" for n in hooks) or "not delivered",
            hooks == [2],
        )
    ]


def _dead_lettered_then_replayed(run: Run) -> list[Check]:
    charged = [run.result(t).get("charged") for t in run.ids("charge")]
    amounts = ", ".join(
        f"{c / 100:.2f}" if isinstance(c, int | float) else "nothing" for c in charged
    )
    return [
        Check(
            "charge: dead-lettered, replayed, charged once",
            f"replayed {_times(run.replayed)}, charged {amounts} {_times(len(charged))}",
            run.replayed == 1 and charged == [4999],
        )
    ]


def _scheduled_and_broadcast(run: Run) -> list[Check]:
    late = [
        run.result(t).get("ran_at", 0) - _eta(run.result(t).get("eta")) for t in run.ids("reminder")
    ]
    cast = [run.result(t).get("worker", "") for t in run.ids("broadcast")]
    return [
        # Started after its due time by: waiting in Redis, then for a free worker (A's
        # processes are busy with reports when it falls due).
        Check(
            "reminder: not run before its countdown; started after it by",
            ", ".join(f"{x:.2f}s" for x in late),
            all(x >= 0 for x in late),
        ),
        Check(
            "broadcast reached the live worker",
            ", ".join(cast),
            all(w.startswith("demo-b@") for w in cast),
        ),
    ]


def _times(n: int) -> str:
    return {0: "never", 1: "once", 2: "twice"}.get(n, f"{n} times")


def _eta(value: Any) -> float:
    ms = epoch_ms(value)
    return 0.0 if ms is None else ms / 1000.0
