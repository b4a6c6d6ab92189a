"""``celery -A proj msg migrate --from redis://...``: move tasks waiting in kombu's ``redis://``
transport into this app's celery-msg broker (see :mod:`celery_msg.migrate`)."""

from __future__ import annotations

import json
import sys

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from .api import broker_for
from .errors import CeleryMsgError
from .migrate import Migration, Report
from .options import TransportOptions


@click.command(name="migrate")
@click.option(
    "--from", "source_url", required=True, metavar="URL",
    help="kombu's redis:// (or rediss://) URL the tasks wait in, with its database number.",
)  # fmt: skip
@click.option("--queue", "-q", "queues", multiple=True, help="Only this queue (repeat).")
@click.option(
    "--global-keyprefix", default="", help="kombu's global_keyprefix on the source, if any."
)
@click.option(
    "--include-unacked", is_flag=True,
    help="Also move what kombu consumers hold (stop every redis:// worker first).",
)  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Only count what would be moved.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="JSON summary.")
@click.pass_context
def migrate(
    ctx: click.Context,
    source_url: str,
    queues: tuple[str, ...],
    global_keyprefix: str,
    include_unacked: bool,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Move the tasks waiting in a kombu redis:// broker into this app's celery-msg queues:
    ids, headers, priorities and ETAs kept; safe to interrupt and run again."""
    app = getattr(ctx.find_root().obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run it as `celery -A proj msg migrate ...`")
    options = TransportOptions.from_mapping(app.conf.broker_transport_options or {})
    source = redis.Redis.from_url(source_url)
    try:
        with broker_for(app) as broker:
            migration = Migration(
                source,
                broker,
                key_prefix=global_keyprefix,
                default_priority=options.default_priority,
                priority_order=options.priority_order,
            )
            chosen = list(queues) or migration.queues()
            counted = migration.run(chosen, include_unacked=include_unacked, dry_run=True)
            waiting = counted.total.waiting
            if dry_run or not waiting:
                _show(counted, as_json)
                return
            if not yes and not click.confirm(
                f"move {waiting} messages from {len(chosen)} queues?", err=True
            ):
                raise click.Abort()
            report = _with_progress(migration, chosen, include_unacked, waiting, as_json)
    except redis.RedisError as exc:
        raise click.ClickException(f"the source {source_url}: {exc}") from exc
    except CeleryMsgError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    finally:
        source.close()
    _show(report, as_json)


def _with_progress(
    migration: Migration, queues: list[str], include_unacked: bool, total: int, quiet: bool
) -> Report:
    with Progress(
        TextColumn("migrate"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        disable=quiet or not sys.stderr.isatty(),
        transient=True,
    ) as progress:
        bar = progress.add_task("migrate", total=total)
        return migration.run(
            queues,
            include_unacked=include_unacked,
            progress=lambda n: progress.advance(bar, n),
        )


def _show(report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    table = Table(title="dry run: nothing moved" if report.dry_run else None)
    columns = ["queue", "waiting"]
    if not report.dry_run:
        columns += ["moved", "already there", "scheduled", "undecodable"]
    for name in columns:
        table.add_column(name, overflow="fold")
    for queue, row in sorted(report.queues.items()):
        counts = row.as_dict()
        cells = [queue, str(counts["waiting"])]
        if not report.dry_run:
            cells += [
                str(counts[k]) for k in ("moved", "already_there", "scheduled", "undecodable")
            ]
        table.add_row(*cells)
    Console().print(table)
