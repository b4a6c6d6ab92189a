"""The benchmark groups ``--only`` selects; each runs both transports, run after run.

Within a run the transports alternate (ours, kombu, ours, kombu, ...), so that load from other
processes on a busy machine falls on both; which one goes first changes from run to run. Every
group returns ``{metric: {transport: summary}}``; a summary holds the median, the runs and the
unit.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from . import (
    bulk,
    celery_e2e,
    chaos,
    eta,
    idle,
    latency,
    long_task,
    raw,
    recovery,
    scrape,
    vs_dramatiq,
)
from .common import KOMBU, LABELS, OURS, TRANSPORTS, Bench, median, summarize

Results = dict[str, dict[str, Any]]

#: (metric, pool, concurrency) of the end-to-end runs.
E2E_POOLS = (("e2e_solo", "solo", None), ("e2e_prefork", "prefork", 2))
#: The same runs with a task that does not wait for its own bookkeeping (bench.tasks
#: noop_unwaited): what the worker's broker costs, without a task's round trip beside it.
E2E_UNWAITED = (("e2e_solo_unwaited", "solo", None), ("e2e_prefork_unwaited", "prefork", 2))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_raw(bench: Bench) -> Results:
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(1, bench.settings.runs + 1):
        for queue_count in (1, 4):
            for transport in _order(run):
                out = raw.run(bench, transport, queue_count)
                for name, value in out.items():
                    phase, _, cpu = name.partition("_")
                    values[f"raw_{phase}_{queue_count}q{'_' + cpu if cpu else ''}"][
                        transport
                    ].append(value)
                log(
                    f"raw run {run} {LABELS[transport]:>11} {queue_count}q: "
                    f"publish {out['publish']:,.0f}/s consume+ack {out['consume']:,.0f}/s; "
                    f"CPU us/msg publish {out['publish_client_cpu_us']:.0f} client + "
                    f"{out['publish_server_cpu_us']:.0f} server, consume "
                    f"{out['consume_client_cpu_us']:.0f} + {out['consume_server_cpu_us']:.0f}"
                )
    return {
        metric: {
            transport: summarize(runs, "us/msg" if metric.endswith("_us") else "msgs/s")
            for transport, runs in by_transport.items()
        }
        for metric, by_transport in values.items()
    }


def run_e2e(bench: Bench) -> Results:
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(1, bench.settings.runs + 1):
        for metric, pool, concurrency in (*E2E_POOLS, *E2E_UNWAITED):
            unwaited = metric.endswith("_unwaited")
            task = celery_e2e.NOOP_UNWAITED if unwaited else celery_e2e.NOOP
            for transport in _order(run):
                out = celery_e2e.run(bench, transport, pool, concurrency, task_name=task)
                values[metric][transport].append(out["tasks_per_s"])
                if not unwaited:
                    values["celery_publish"][transport].append(out["publish"])
                log(
                    f"e2e run {run} {LABELS[transport]:>11} -P {pool}{' (unwaited)' * unwaited}: "
                    "publish "
                    f"{out['publish']:,.0f}/s, worker {out['tasks_per_s']:,.0f} tasks/s "
                    f"(startup {out['startup_s']:.1f} s)"
                )
    return _summaries(values, "tasks/s")


def run_bulk(bench: Bench) -> Results:
    """Enqueue rates (bench/bulk.py): each shape's figures back to back. Our bulk figures are
    held against kombu's plain ones (what a Celery app on kombu's redis transport gets); the
    log shows each run's ratios, the report the ratio of the medians."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(1, bench.settings.runs + 1):
        out = bulk.run(bench, run)
        window = out.pop("window_ms")[OURS][0]
        values["bulk_window_ms"][OURS].append(window)
        values["bulk_group_derived"][OURS].append(out.pop("derived")[OURS][0])
        values["bulk_delay_derived"][OURS].append(out.pop("delay_derived")[OURS][0])
        for figure, by_transport in out.items():
            for transport, (rate, cpu) in by_transport.items():
                values[f"enqueue_{figure}"][transport].append(rate)
                values[f"enqueue_{figure}_cpu_us"][transport].append(cpu)
        for shape in ("group", "delay"):
            kombu_rate, kombu_cpu = out[shape][KOMBU]
            values[f"enqueue_{shape}_bulk"][KOMBU].append(kombu_rate)
            values[f"enqueue_{shape}_bulk_cpu_us"][KOMBU].append(kombu_cpu)
        log(
            f"bulk run {run}: "
            + "; ".join(
                f"{figure} "
                + ", ".join(f"{LABELS[t]} {r:,.0f}/s {c:.0f} us" for t, (r, c) in by.items())
                for figure, by in out.items()
            )
            + "; ratios bulk/kombu: "
            + ", ".join(
                f"{shape} {out[shape + '_bulk'][OURS][0] / out[shape][KOMBU][0]:.2f}x"
                for shape in ("group", "delay")
            )
            + f"; window {window:.0f} ms"
        )
    results: Results = {}
    for metric, runs_by in values.items():
        unit = (
            "ms" if metric.endswith("_ms") else "us/task" if metric.endswith("_us") else "tasks/s"
        )
        results[metric] = {t: summarize(runs, unit) for t, runs in runs_by.items()}
    return results


def run_idle(bench: Bench) -> Results:
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(1, bench.settings.runs + 1):
        for transport in _order(run):
            out = idle.run(bench, transport)
            values["idle_worker"][transport].append(out["worker_pct"])
            values["idle_server"][transport].append(out["server_pct"])
            log(
                f"idle run {run} {LABELS[transport]:>11}: worker {out['worker_pct']:.2f} % "
                f"server {out['server_pct']:.2f} % of one core"
            )
    return _summaries(values, "% of one core")


def run_latency(bench: Bench) -> Results:
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(1, bench.settings.runs + 1):
        for transport in _order(run):
            out = latency.run(bench, transport)
            values["latency_p50"][transport].append(out["p50_ms"])
            values["latency_p99"][transport].append(out["p99_ms"])
            log(
                f"latency run {run} {LABELS[transport]:>11}: p50 {out['p50_ms']:.1f} ms "
                f"p99 {out['p99_ms']:.1f} ms max {out['max_ms']:.1f} ms"
            )
    return _summaries(values, "ms")


def run_recovery(bench: Bench) -> Results:
    s = bench.settings
    results: Results = {"recovery": {}, "recovery_vt": {}}
    results["recovery"][OURS] = _recover(bench, OURS, s.runs, s.recovery_cap, {})
    results["recovery"][KOMBU] = _recover(
        bench, KOMBU, s.runs, s.recovery_cap, {}, note="visibility_timeout 3600 s"
    )
    if s.quick:
        log("recovery: kombu with visibility_timeout=30 skipped in --quick")
        del results["recovery_vt"]
    else:
        results["recovery_vt"][KOMBU] = _recover(
            bench,
            KOMBU,
            1,
            s.kombu_vt_cap,
            {"visibility_timeout": s.kombu_vt},
            note=f"visibility_timeout {s.kombu_vt:.0f} s",
        )
    return results


def run_long_task(bench: Bench) -> Results:
    """How often a task running 3x the broker's timeout starts (one run each: it is slow)."""
    timeout = 5.0
    results: Results = {"long_task_runs": {}}
    for transport in TRANSPORTS:
        out = long_task.run(bench, transport, timeout)
        log(f"long task {LABELS[transport]:>11}: started {out['starts']} time(s)")
        results["long_task_runs"][transport] = summarize([float(out["starts"])], "starts", **out)
    return results


def run_eta(bench: Bench) -> Results:
    """Countdown tasks held by the worker (memory) and ETA punctuality (lateness)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    details: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in range(1, bench.settings.runs + 1):
        for transport in _order(run):
            out = eta.memory(bench, transport)
            details[transport].append(out)
            values["eta_rss"][transport].append(out["rss_mb"])
            values["eta_server"][transport].append(out["server_mb"])
            values["eta_ran"][transport].append(out["ran"])
            log(
                f"eta memory run {run} {LABELS[transport]:>11}: {out['n']:,} tasks, worker RSS "
                f"+{out['rss_mb']:.1f} MB ({out['rss_before_mb']:.0f} -> "
                f"{out['rss_after_mb']:.0f} MB), server +{out['server_mb']:.1f} MB, ran "
                f"{out['ran']}; publish {out['publish_per_s']:,.0f}/s, all received "
                f"{out['receive_after_publish_s']:.1f} s after publishing"
            )
        for transport in _order(run):
            out = eta.lateness(bench, transport)
            details[transport].append(out)
            values["eta_late_p50"][transport].append(out["p50_ms"])
            values["eta_late_p99"][transport].append(out["p99_ms"])
            values["eta_early"][transport].append(out["early"])
            values["eta_not_once"][transport].append(out["not_once"])
            log(
                f"eta lateness run {run} {LABELS[transport]:>11}: p50 {out['p50_ms']:.1f} ms "
                f"p99 {out['p99_ms']:.1f} ms (min {out['min_ms']:.1f}, max "
                f"{out['max_ms']:.1f}); early {out['early']}, missing {out['missing']}, "
                f"duplicates {out['duplicates']}"
            )
    units = {"eta_rss": "MB", "eta_server": "MB", "eta_late_p50": "ms", "eta_late_p99": "ms"}
    results: Results = {
        metric: {
            transport: summarize(runs, units.get(metric, "tasks"), total=sum(runs))
            for transport, runs in by_transport.items()
        }
        for metric, by_transport in values.items()
    }
    for transport, runs in details.items():
        results["eta_rss"][transport]["details"] = runs
    return results


#: chaos metric -> (key in chaos.analyse's result, unit).
CHAOS_METRICS = {
    "chaos_lost": ("lost", "tasks"),
    "chaos_dup_completions": ("dup_completions", "tasks"),
    "chaos_dup_starts": ("dup_starts", "tasks"),
    "chaos_kills": ("kills", "kills"),
    "chaos_dup_per_kill": ("dup_per_kill", "tasks/kill"),
    "chaos_kills_busy": ("kills_busy", "kills"),
    "chaos_dup_per_busy_kill": ("dup_per_busy_kill", "tasks/kill"),
    "chaos_recovery": ("recovery_s", "s"),
    "chaos_wall": ("wall_s", "s"),
}
#: Duplicate completions per cause (bench.chaos.attribute), metric -> cause.
CHAOS_CAUSE_METRICS = {f"chaos_dup_{cause}": cause for cause in chaos.CAUSES}


def _chaos_unit(metric: str) -> str:
    if metric in CHAOS_METRICS:
        return CHAOS_METRICS[metric][1]
    per_kill = ("chaos_dup_kill_per_kill", "chaos_dup_kill_per_busy_kill")
    return "tasks/kill" if metric in per_kill else "tasks"


def run_chaos(bench: Bench) -> Results:
    """Two workers under faults, then the single-worker figure (see bench/chaos.py)."""
    s = bench.settings
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    details: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in range(1, s.runs + 1):
        for transport in _order(run):
            out = chaos.run(bench, transport, seed=run)
            details[transport].append(out)
            for metric, (key, _) in CHAOS_METRICS.items():
                if out[key] is not None:
                    values[metric][transport].append(out[key])
            by_cause = out["dup_completions_by_cause"]
            for metric, cause in CHAOS_CAUSE_METRICS.items():
                values[metric][transport].append(by_cause[cause])
            values["chaos_dup_kill_per_kill"][transport].append(
                by_cause["kill"] / out["kills"] if out["kills"] else 0.0
            )
            values["chaos_dup_kill_per_busy_kill"][transport].append(
                by_cause["kill"] / out["kills_busy"] if out["kills_busy"] else 0.0
            )
            recovery = "-" if out["recovery_s"] is None else f"{out['recovery_s']:.1f} s"
            log(
                f"chaos run {run} {LABELS[transport]:>11}: {s.chaos_n:,} tasks in "
                f"{out['wall_s']:.0f} s, lost {out['lost']}, duplicate completions "
                f"{out['dup_completions']} ({out['dup_per_kill']:.2f}/kill, {out['kills']} kills; "
                f"{out['dup_per_busy_kill']:.2f}/busy kill, {out['kills_busy']} busy), "
                f"duplicate starts {out['dup_starts']}, recovery {recovery}; publish retries "
                f"{out['publish_retries']}, crashes {len(out['crashes'])}, dead {out['dead']}; "
                f"duplicate completions by cause {by_cause}"
            )
    results: Results = {
        metric: {
            transport: summarize(runs, _chaos_unit(metric), runs_total=sum(runs))
            for transport, runs in by_transport.items()
        }
        for metric, by_transport in values.items()
    }
    for transport, runs in details.items():
        results.setdefault("chaos_lost", {}).setdefault(transport, summarize([0.0], "tasks"))[
            "details"
        ] = runs
    for run in range(1, s.runs + 1):
        for suffix, (pool, concurrency) in chaos.SINGLE_POOLS.items():
            for transport in _order(run):
                out = chaos.single(bench, transport, pool, concurrency)
                metric = f"chaos_single_{suffix}"
                entry = results.setdefault(metric, {}).setdefault(
                    transport, {"runs": [], "unit": "tasks/kill", "details": []}
                )
                entry["runs"].append(out["dup_per_kill"])
                entry["median"] = median(entry["runs"])
                entry["details"].append(out)
                busy = results.setdefault(f"{metric}_busy", {}).setdefault(
                    transport, {"runs": [], "unit": "tasks/kill"}
                )
                busy["runs"].append(out["dup_per_busy_kill"])
                busy["median"] = median(busy["runs"])
                log(
                    f"chaos single run {run} {LABELS[transport]:>11} -P {pool}: "
                    f"{s.chaos_single_n:,} tasks, {out['kills']} kills ({out['kills_busy']} "
                    f"busy), re-ran {out['dup_completions']} finished tasks "
                    f"({out['dup_per_kill']:.2f}/kill, {out['dup_per_busy_kill']:.2f}/busy kill), "
                    f"lost {out['lost']}, {out['wall_s']:.0f} s"
                )
    return results


def run_memory(bench: Bench) -> Results:
    """Redis memory per waiting message (one run: it is deterministic up to allocator noise)."""
    s = bench.settings
    results: Results = {"memory_per_message": {}}
    for transport in TRANSPORTS:
        out = chaos.memory(bench, transport, s.memory_n, s.memory_size)
        results["memory_per_message"][transport] = summarize([out["per_message_b"]], "B", **out)
        top = ", ".join(f"{k} {v:.1f} MB" for k, v in list(out["keys_mb"].items())[:4])
        log(
            f"memory {LABELS[transport]:>11}: {out['n']:,} x {out['message_bytes']} B waiting: "
            f"{out['per_message_b']:,.0f} B/message ({out['used_memory_mb']:.1f} MB); {top}"
        )
    return results


def run_scrape(bench: Bench) -> Results:
    """A Prometheus scrape of 10, 100 and 1,000 queues (celery-msg only: kombu has no exporter
    of its own; celery-exporter reads only the length of kombu's lists)."""
    results: Results = {}
    for queue_count in bench.settings.scrape_queues:
        runs = [scrape.run(bench, queue_count) for _ in range(bench.settings.runs)]
        times = [r["scrape_ms"] for r in runs]
        last = runs[-1]
        results[f"scrape_{queue_count}q"] = {
            OURS: summarize(
                times,
                "ms",
                queues=queue_count,
                round_trips=max(r["round_trips"] for r in runs),
                bytes=last["bytes"],
                series=last["series"],
            )
        }
        log(
            f"scrape {queue_count:>5} queues: {median(times):.1f} ms (runs "
            f"{', '.join(f'{t:.1f}' for t in times)}), {last['round_trips']} round trips, "
            f"{last['series']:,} series, {last['bytes'] / 1000:,.0f} kB"
        )
    return results


def _recover(
    bench: Bench, transport: str, runs: int, cap: float, options: dict[str, Any], note: str = ""
) -> dict[str, Any]:
    """Runs of one recovery setting; stops after the first run that hit the cap."""
    times: list[float | None] = []
    details: list[dict[str, Any]] = []
    for run in range(1, runs + 1):
        out = recovery.run(bench, transport, cap, options)
        times.append(out["recovery_s"])
        details.append(out)
        shown = "nothing" if out["recovery_s"] is None else f"{out['recovery_s']:.1f} s"
        log(f"recovery run {run} {LABELS[transport]:>11} {options or ''}: {shown}, cap {cap:.0f} s")
        if out["recovery_s"] is None:
            break
    capped = any(t is None for t in times)
    summary = summarize(
        [t for t in times if t is not None] or [0.0], "s", options=options, details=details
    )
    if capped:
        summary.update(median=None, cap_s=cap, note=note, runs=times)
    return summary


def _order(run: int) -> tuple[str, ...]:
    """Which transport goes first alternates from run to run (warm-up and drift even out)."""
    return TRANSPORTS if run % 2 else TRANSPORTS[::-1]


def _summaries(values: dict[str, dict[str, list[float]]], unit: str) -> Results:
    return {
        metric: {transport: summarize(runs, unit) for transport, runs in by_transport.items()}
        for metric, by_transport in values.items()
    }


def run_dramatiq(bench: Bench) -> Results:
    """Dramatiq against Celery e2e with a bulk publisher (bench/vs_dramatiq.py); results keyed
    ``dramatiq`` and ``celery-msg``. Without Dramatiq installed: nothing, and the log says so."""
    if not vs_dramatiq.installed():
        log("dramatiq: not installed (pip install 'celery-msg[bench]'); group skipped")
        return {"dramatiq_installed": {vs_dramatiq.DRAMATIQ: {"median": 0.0, "runs": []}}}
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(1, bench.settings.runs + 1):
        out = vs_dramatiq.run(bench, run)
        for who, figures in out.items():
            for name, value in figures.items():
                values[f"dramatiq_{name}"][who].append(value)
        log(
            f"dramatiq run {run}: "
            + "; ".join(
                f"{who}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in figures.items())
                for who, figures in out.items()
            )
        )
    return _summaries(values, "tasks/s")


GROUPS: dict[str, Callable[[Bench], Results]] = {
    "raw": run_raw,
    "e2e": run_e2e,
    "idle": run_idle,
    "latency": run_latency,
    "recovery": run_recovery,
    "long": run_long_task,
    "eta": run_eta,
    "chaos": run_chaos,
    "memory": run_memory,
    "bulk": run_bulk,
    "scrape": run_scrape,
    "dramatiq": run_dramatiq,
}
