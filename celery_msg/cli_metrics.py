"""``celery -A proj msg metrics``: serve the broker's queues as Prometheus metrics over HTTP
(see :mod:`celery_msg.metrics`), for a Prometheus server, KEDA or Grafana Agent to scrape."""

from __future__ import annotations

import threading

import click

from .api import broker_for
from .errors import CeleryMsgError
from .snapshot import QueueKind


@click.command(name="metrics")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9808, show_default=True,
    help="TCP port of the /metrics endpoint.",
)  # fmt: skip
@click.option(
    "--address", default="127.0.0.1", show_default=True,
    help="Address to listen on (0.0.0.0 for every interface; metrics are read only).",
)  # fmt: skip
@click.option(
    "--kind", "kinds", multiple=True, type=click.Choice([k.value for k in QueueKind]),
    help="Kinds of queue to export (repeat); default: normal (task queues) only.",
)  # fmt: skip
@click.option("--once", is_flag=True, help="Print the metrics once to stdout and exit.")
@click.pass_context
def metrics(
    ctx: click.Context, port: int, address: str, kinds: tuple[str, ...], once: bool
) -> None:
    """Serve Prometheus metrics of this app's celery-msg queues: messages by state, oldest
    age, consumers, lifetime counters."""
    # prometheus-client only here: every other `celery msg` command starts without it.
    from prometheus_client import CollectorRegistry, generate_latest, start_http_server

    from .metrics import DEFAULT_KINDS, QueueCollector

    app = getattr(ctx.find_root().obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run it as `celery -A proj msg metrics ...`")
    chosen = frozenset(QueueKind(k) for k in kinds) or DEFAULT_KINDS
    try:
        with broker_for(app) as broker:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(QueueCollector(broker, kinds=chosen))
            if once:
                click.echo(generate_latest(registry).decode(), nl=False)
                return
            try:
                server, thread = start_http_server(port, addr=address, registry=registry)
            except OSError as exc:
                raise click.ClickException(f"cannot listen on {address}:{port}: {exc}") from exc
            bound = server.server_address[1]
            click.echo(f"serving celery-msg metrics on http://{address}:{bound}/metrics", err=True)
            try:
                threading.Event().wait()  # until interrupted (Ctrl-C, SIGTERM ends the process)
            except KeyboardInterrupt:
                pass
            finally:
                server.shutdown()
                thread.join(timeout=5)
    except CeleryMsgError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
