"""``celery -A proj msg ...``: the dead-letter workflow and message look-ups, from the shell.

Registered through Celery's ``celery.commands`` entry point, so it runs inside ``celery`` with
the app of ``-A`` and reads that app's own broker settings: no second configuration to keep in
sync. Every command has ``--json`` for scripts; replay and purge show a progress bar on a
terminal and ask before touching messages unless ``--yes`` is given.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from .api import broker_for
from .cli_metrics import metrics
from .cli_migrate import migrate
from .core import UNREADABLE_RECORD, MessageInfo, State
from .deadletters import DeadFilter, DeadLetters, DeadMessage, decode_body, decode_message
from .errors import CeleryMsgError, MessageNotFound
from .headers import FIRST_FAILURE_HEADER

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1w`` as seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 2h or 7d")
    return float(match.group(1)) * _UNIT[match.group(2)]


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except click.BadParameter as exc:
            self.fail(str(exc.message), param, ctx)


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run it as `celery -A proj msg ...`")
    return app


@contextmanager
def _dead_letters(ctx: click.Context) -> Iterator[DeadLetters]:
    try:
        with broker_for(_app(ctx)) as broker:
            yield DeadLetters(broker)
    except MessageNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    except CeleryMsgError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _when(seconds: float | None, *, short: bool = False) -> str:
    if not seconds:
        return "-"
    try:
        moment = datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return f"? ({seconds!r})"
    return moment.strftime("%Y-%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S UTC")


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _filters(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--queue", "-q", help="Only this queue (default: every queue)."),
        click.option("--task", "-t", help="Task name, or a glob such as 'reports.*'."),
        click.option("--exc-type", "-e", help="Exception class name (ValueError) or full name."),
        click.option("--reason", "-r", help="failed, poison, expired, undecodable, rejected, ..."),
        click.option(
            "--older-than", type=Duration(), help="Last failure at least this long ago (15m, 2h)."
        ),
        click.option("--newer-than", type=Duration(), help="Last failure at most this long ago."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _where(**kwargs: Any) -> DeadFilter:
    return DeadFilter(
        queue=kwargs.get("queue"),
        task=kwargs.get("task"),
        exc_type=kwargs.get("exc_type"),
        reason=kwargs.get("reason"),
        older_than=kwargs.get("older_than"),
        newer_than=kwargs.get("newer_than"),
    )


@click.group(name="msg")
def msg() -> None:
    """celery-msg: dead letters and message look-ups for this app's broker."""


@msg.group()
def dlq() -> None:
    """The dead-letter store: list, show, replay, purge."""


@dlq.command(name="list")
@_filters
@click.option(
    "--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True,
    help="Most rows shown.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
def dlq_list(ctx: click.Context, /, limit: int, as_json: bool, **filters: Any) -> None:
    """List dead messages, oldest first."""
    with _dead_letters(ctx) as store:
        found = list(itertools.islice(store.iter(_where(**filters)), limit))
    if as_json:
        _emit_json([m.as_dict() for m in found])
        _report_unreadable(store.unreadable)
        return
    if not found:
        click.echo("no dead messages match")
        _report_unreadable(store.unreadable)
        return
    # An id is copied into `dlq show`: it never wraps or is cut, whatever the terminal width.
    # A table when it fits with every column readable, else one block per message.
    console = Console()
    table = _dead_table(found, limit)
    # rich drops columns rather than overflow: compare with every column's minimum ourselves.
    needed = sum(c.min_width or 0 for c in table.columns) + 2 * (len(table.columns) - 1)
    if needed <= console.width:
        console.print(table)
    else:
        for m in found:
            click.echo(m.id)
            click.echo(
                f"    {m.queue}  {m.task or '-'}  {m.reason}  {m.deliveries} deliveries  "
                f"{_when(m.last_failure)}"
            )
            if m.detail:
                click.echo(f"    {m.detail[:200]}")
    _report_unreadable(store.unreadable)


def _dead_table(found: list[DeadMessage], limit: int) -> Table:
    table = Table(
        title=f"dead messages (first {limit})" if len(found) >= limit else None,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("id", no_wrap=True, min_width=max(len(m.id) for m in found))
    table.add_column("queue", overflow="fold", min_width=6)
    table.add_column("task", overflow="fold", min_width=12)
    table.add_column("reason", overflow="fold", min_width=7)
    table.add_column("detail", overflow="fold", min_width=16, ratio=1)
    table.add_column("deliv.", no_wrap=True, justify="right", min_width=6)
    table.add_column("last failure (UTC)", no_wrap=True, min_width=19)
    for m in found:
        table.add_row(
            m.id, m.queue, m.task or "-", m.reason, m.detail[:80], str(m.deliveries),
            _when(m.last_failure, short=True),
        )  # fmt: skip
    return table


def _report_unreadable(count: int) -> None:
    """Records another program wrote badly (not JSON, names not UTF-8): counted, not raised."""
    if count:
        click.echo(
            f"{count} unreadable record(s) skipped or shown as {UNREADABLE_RECORD} "
            f"(not JSON, or names that are not UTF-8); see the log",
            err=True,
        )


@dlq.command(name="show")
@click.argument("message_id")
@click.option("--queue", "-q", help="Look only in this queue.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
def dlq_show(ctx: click.Context, message_id: str, queue: str | None, as_json: bool) -> None:
    """Everything kept about one dead message: record, headers, body, traceback."""
    with _dead_letters(ctx) as store:
        message = store.get(message_id, queue)
    if as_json:
        _emit_json(message.as_dict(with_body=True))
        return
    console = Console()
    details = message.as_dict(with_body=True)
    for field in ("id", "key", "queue", "task", "reason", "detail", "exc_type", "exc_message"):
        console.print(f"[bold]{field:>14}[/bold]  {details[field]}")
    console.print(f"[bold]{'deliveries':>14}[/bold]  {message.deliveries}")
    console.print(f"[bold]{'retries':>14}[/bold]  {message.retries}")
    console.print(f"[bold]{'first failure':>14}[/bold]  {_when(message.first_failure)}")
    console.print(f"[bold]{'last failure':>14}[/bold]  {_when(message.last_failure)}")
    body = decode_body(message.payload)
    if body.args is not None:
        for name, value in (("args", body.args), ("kwargs", body.kwargs)):
            text = json.dumps(value, ensure_ascii=False, default=str)
            console.print(f"[bold]{name:>14}[/bold]  ", end="")
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(f"[bold]{'body':>14}[/bold]  ({body.note})")
        if body.text is not None:
            console.print(body.text, markup=False, highlight=False)
    console.print("[bold]headers[/bold]")
    console.print_json(json.dumps(message.headers, default=str))
    if message.traceback:
        console.print("[bold]traceback[/bold]")
        console.print(message.traceback, markup=False, highlight=False)


def _select(
    store: DeadLetters, ids: tuple[str, ...], everything: bool, filters: dict[str, Any]
) -> list[DeadMessage]:
    where = _where(**filters)
    if ids:
        chosen = [store.get(i, where.queue) for i in ids]
        return [m for m in chosen if where.matches(m, time.time())]
    if not everything and where == DeadFilter(queue=where.queue):
        raise click.UsageError("name message ids, give a filter, or pass --all")
    return list(store.iter(where))


def _run_bulk(
    ctx: click.Context,
    verb: str,
    ids: tuple[str, ...],
    everything: bool,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    filters: dict[str, Any],
) -> None:
    with _dead_letters(ctx) as store:
        chosen = _select(store, ids, everything, filters)
        if dry_run or not chosen:
            if as_json:
                _emit_json({"matched": len(chosen), verb: 0, "dry_run": dry_run})
            else:
                click.echo(f"{len(chosen)} dead messages match; nothing done")
            return
        if not yes and not click.confirm(f"{verb} {len(chosen)} dead messages?", err=True):
            raise click.Abort()
        act = store.replay if verb == "replay" else store.purge
        show = sys.stderr.isatty() and not as_json
        with Progress(
            TextColumn(f"{verb}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            disable=not show,
            transient=True,
        ) as progress:
            bar = progress.add_task(verb, total=len(chosen))
            done = act(chosen, progress=lambda n: progress.advance(bar, n))
    skipped = len(chosen) - done
    if as_json:
        _emit_json({"matched": len(chosen), verb: done, "skipped": skipped})
    else:
        past = "replayed" if verb == "replay" else "purged"
        note = f" ({skipped} were no longer dead: replayed or purged meanwhile)" if skipped else ""
        click.echo(f"{past} {done} of {len(chosen)} dead messages{note}")


def _bulk_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.argument("ids", nargs=-1),
            click.option("--all", "everything", is_flag=True, help="Every dead message."),
            click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
            click.option("--dry-run", is_flag=True, help="Only count what would be touched."),
            click.option("--json", "as_json", is_flag=True, help="JSON output."),
        ]
    ):
        func = option(func)
    return _filters(func)


def _bulk_command(verb: str, summary: str) -> click.Command:
    """``dlq replay`` and ``dlq purge``: the same selection, a different script."""

    @dlq.command(name=verb, help=summary)
    @_bulk_options
    @click.pass_context
    def command(
        ctx: click.Context,
        /,
        ids: tuple[str, ...],
        everything: bool,
        yes: bool,
        dry_run: bool,
        as_json: bool,
        **filters: Any,
    ) -> None:
        _run_bulk(ctx, verb, ids, everything, yes, dry_run, as_json, filters)

    return command


dlq_replay = _bulk_command(
    "replay", "Put dead messages back at the end of their queue (each one at most once)."
)
dlq_purge = _bulk_command("purge", "Delete dead messages for good.")


@msg.command(name="web")
@click.option("--port", type=click.IntRange(0, 65535), default=5556, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--auth", type=click.Choice(["none", "basic", "token"]), default="none", show_default=True,
    help="basic: CELERY_MSG_WEB_USER and CELERY_MSG_WEB_PASSWORD; token: CELERY_MSG_WEB_TOKEN "
    "(from the environment). Required to bind an address other than loopback.",
)  # fmt: skip
@click.option(
    "--sample-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
    help="Seconds between two readings of the counters behind the rate charts.",
)  # fmt: skip
@click.pass_context
def web(ctx: click.Context, port: int, address: str, auth: str, sample_interval: float) -> None:
    """The dashboard: queues, messages, dead letters (replay, purge), look-ups."""
    try:
        from .web.security import Auth
        from .web.server import serve
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs the web extra: pip install 'celery-msg[web]' ({exc})"
        ) from exc
    try:
        serve(
            _app(ctx),
            address=address,
            port=port,
            auth=Auth.from_environ(auth),  # type: ignore[arg-type]
            sample_interval=sample_interval,
        )
    except CeleryMsgError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@msg.command(name="inspect")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_context
def inspect_message(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """One message's state in the broker and its history, by ID (a Celery task id)."""
    app = _app(ctx)
    ascending = (app.conf.broker_transport_options or {}).get("priority_order") == "asc"
    try:
        with broker_for(app) as broker:
            _, unreadable = broker.queue_registry()
            found, skipped = broker.search(message_id)
    except CeleryMsgError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    result = _result_state(app, message_id)
    if as_json:
        _emit_json(
            {
                "id": message_id,
                "result": result,
                "instances": [_info_dict(i, ascending) for i in found],
            }
        )
        _report_unreadable(unreadable)
        _report_skipped(skipped)
        return
    console = Console()
    console.print(f"[bold]message[/bold] {message_id}   [bold]result[/bold] {result or '-'}")
    if not found:
        console.print("no trace in the broker: acked (done), purged, or never published")
    for info in found:
        console.print(f"\n[bold]{info.state}[/bold] in queue [bold]{info.queue}[/bold]")
        for line in history(info, ascending):
            console.print(f"  {line}", markup=False, highlight=False)
    _report_unreadable(unreadable)
    _report_skipped(skipped)


def _report_skipped(skipped: dict[str, str]) -> None:
    """Queues a search could not read (their keys are corrupted): named, not a traceback."""
    for queue, error in skipped.items():
        click.echo(f"skipped queue {queue!r}: it cannot be read ({error})", err=True)


def priority_of(info: MessageInfo, ascending: bool = False) -> int | None:
    """The message's priority (0..255) from its band: ``desc`` order stores 255 - priority."""
    if info.priority_band is None:
        return None
    return info.priority_band if ascending else 255 - info.priority_band


def history(info: MessageInfo, ascending: bool = False) -> list[str]:
    """What the broker knows of a stored message's past, oldest first, one line per fact."""
    headers = decode_message(info.payload or b"").get("headers")
    headers = headers if isinstance(headers, dict) else {}
    first_served = "lower" if ascending else "higher"
    priority = priority_of(info, ascending)
    lines = [
        f"published as {info.key} (priority {'unreadable' if priority is None else priority} "
        f"of 0-255, {first_served} served first)"
    ]
    retries = _int(headers.get("retries"))
    if retries:
        first = _int(headers.get(FIRST_FAILURE_HEADER))
        since = f", first failure {_when(first / 1000)}" if first else ""
        lines.append(f"retry {retries} of the task{since}")
    if headers.get("eta"):
        lines.append(f"eta {headers['eta']}")
    record = info.dead_reason
    replayed = record is not None and info.state is not State.DEAD
    if replayed:
        # replay keeps the record of the earlier death until the message is acked.
        lines.append(f"{_died(record)}; replayed from the dead-letter store")
    if info.state is State.SCHEDULED:
        lines.append(f"waits in Redis until {_when(info.due)}")
    if info.deliveries:
        since = " since the replay" if replayed else ""
        lines.append(f"delivered {info.deliveries} time(s){since}")
    if info.state is State.RESERVED:
        lines.append(f"leased to {info.owner} until {_when(info.lease_deadline)}")
    if info.state is State.READY:
        lines.append("waiting in its queue")
    if info.state is State.DEAD and record:
        lines.append(_died(record))
    return lines


def _died(record: dict[str, Any] | None) -> str:
    record = record or {}
    when = record.get("time")
    return (
        f"dead-lettered {_when(when if isinstance(when, float) else None)}: "
        f"{record.get('reason')}: {record.get('detail')}"
    )


def _int(value: object) -> int:
    """A count or time read from a message's headers, 0 when it is not a number."""
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0


def _info_dict(info: MessageInfo, ascending: bool = False) -> dict[str, Any]:
    return {
        "key": info.key,
        "queue": info.queue,
        "state": str(info.state),
        "deliveries": info.deliveries,
        "priority": priority_of(info, ascending),
        "priority_band": info.priority_band,
        "owner": info.owner,
        "lease_deadline": info.lease_deadline,
        "due": info.due,
        "dead_reason": info.dead_reason,
        "history": history(info, ascending),
    }


def _result_state(app: Any, task_id: str) -> str | None:
    """The task's state in the result backend, when the app has one."""
    try:
        if type(app.backend).__name__ == "DisabledBackend":
            return None
        return str(app.AsyncResult(task_id).state)
    except Exception as exc:  # the backend is optional here; say why it is missing
        return f"unknown ({type(exc).__name__}: {exc})"


msg.add_command(migrate)
msg.add_command(metrics)
