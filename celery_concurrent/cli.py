"""``celery -A proj concurrent ...``: status and runtime control of @concurrent functions.

Installed through Celery's ``celery.commands`` entry point, so it is a subcommand of the
user's usual ``celery`` command and talks to the nodes over remote control.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from kombu.exceptions import OperationalError

from .errors import ConfigurationError, UnknownFunctionError
from .kubernetes import kubernetes as kubernetes_command
from .redact import mask_urls, safe_url
from .registry import specs_of
from .scaler import scaler as scaler_command
from .spec import RUNTIME_BOUND_NAMES, SECONDS_SETTINGS, FunctionSpec
from .status import FunctionStatus, merge

COLUMNS = (
    ("function", "FUNCTION"),
    ("queue", "QUEUE"),
    ("containers_text", "CONTAINERS (run/min/max)"),
    ("scope", "SCOPE"),
    ("in_flight", "IN FLIGHT"),
    ("backlog", "BACKLOG"),
    ("capacity", "CAPACITY"),
    ("last_event", "LAST SCALE EVENT"),
)


def collect_status(app: Any, timeout: float = 1.0) -> list[dict[str, Any]]:
    """One row per function, aggregated over every node that answers."""
    return merge_status(ask_nodes(app, timeout), specs_of(app).values())


def ask_nodes(app: Any, timeout: float) -> dict[str, Any]:
    """Every answering node's ``concurrent_status`` reply, by node name."""
    replies: dict[str, Any] = {}
    # A connection of its own: on Redis a pooled connection whose last broadcast timed out
    # still has a BRPOP pending that swallows the next reply (every other refresh of
    # --watch showed no node). A short BRPOP lets the connection close at once.
    with app.connection_for_write(transport_options={"polling_interval": 0.05}) as conn:
        answers = app.control.broadcast(
            "concurrent_status", reply=True, timeout=timeout, connection=conn
        )
    for reply in answers or []:
        replies.update(reply)
    return replies


def merge_status(
    replies: dict[str, Any], specs: Iterable[FunctionSpec] = ()
) -> list[dict[str, Any]]:
    """Merge the nodes' replies into one row per function (see :func:`status.merge`)."""
    rows = {
        node: [FunctionStatus.from_dict(row) for row in reply.get("functions", [])]
        for node, reply in replies.items()
    }
    return [row.as_dict() for row in merge(rows, specs)]


def _watch_columns() -> tuple[tuple[str, str], ...]:
    """The status columns, with utilisation after the capacity and the errors last."""
    columns = list(COLUMNS)
    keys = [key for key, _ in columns]
    at = keys.index("capacity") + 1 if "capacity" in keys else len(columns)
    columns.insert(at, ("utilisation", "UTILISATION"))
    columns.append(("errors", "ERRORS"))
    return tuple(columns)


#: the columns of ``status --watch``
WATCH_COLUMNS = _watch_columns()


def utilisation(row: dict[str, Any]) -> str:
    """In flight / capacity, as a percentage ("-" with no capacity)."""
    capacity = row.get("capacity") or 0
    return f"{100 * (row.get('in_flight') or 0) / capacity:.0f}%" if capacity else "-"


def errors_of(row: dict[str, Any]) -> str:
    """What is wrong with a function: a crash loop, an unplaceable GPU request, ..."""
    notes = []
    if row.get("crash_loop"):
        notes.append(f"crash loop ({row.get('crashes', 0)} crashes)")
    if row.get("error"):
        notes.append(str(row["error"]))
    if row.get("spec_conflict"):
        notes.append("nodes run it with different settings: the strictest bound holds")
    if row.get("coordination_reachable") is False:
        notes.append("a node cannot reach the coordination Redis")
    return "; ".join(notes) or "-"


#: the columns of ``status --nodes``: one row per node under each function
NODE_COLUMNS = (
    ("function", "FUNCTION / NODE"),
    ("containers_text", "CONTAINERS (run/min/max)"),
    ("scope", "SCOPE"),
    ("in_flight", "IN FLIGHT"),
    ("pids", "PIDS"),
)


def node_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each function's row, then one row per node that serves it (``status --nodes``)."""
    out = []
    for row in rows:
        out.append({**row, "pids": ",".join(map(str, row.get("pids") or [])) or "-"})
        for nodename, view in sorted((row.get("per_node") or {}).items()):
            out.append(
                {
                    **row,
                    **view,
                    "function": f"  {nodename}",
                    "backlog": row.get("backlog"),
                    "pids": ",".join(map(str, view.get("pids") or [])) or "-",
                }
            )
    return out


def with_batches(
    rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """``columns`` and, when a row is a ``@batched`` function's, its mean batch size."""
    if not any(row.get("max_batch_size") for row in rows):
        return columns
    keys = [key for key, _ in columns]
    at = keys.index("in_flight") if "in_flight" in keys else len(columns)
    return (*columns[:at], ("batch_text", "BATCH (mean/max)"), *columns[at:])


def batch_text(row: dict[str, Any]) -> str:
    if not row.get("max_batch_size"):
        return "-"
    mean = row.get("batch_size_mean")
    return f"{'-' if mean is None else format(mean, '.1f')}/{row['max_batch_size']}"


def render_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...] = COLUMNS) -> str:
    columns = with_batches(rows, columns)
    errors_apart = any(key == "errors" for key, _ in columns)
    cells = [[header for _, header in columns]]
    for row in rows:
        maximum = "-" if row["max_containers"] is None else row["max_containers"]
        error = None if errors_apart else row.get("error")
        view = {
            **row,
            "containers_text": f"{row['containers']}/{row['min_containers']}/{maximum}",
            "scope": row.get("scope") if row.get("nodes") else "-",
            "backlog": "?" if row["backlog"] is None else row["backlog"],
            "last_event": error or row.get("last_event") or "-",
            "utilisation": utilisation(row),
            "errors": errors_of(row),
            "batch_text": batch_text(row),
        }
        cells.append([str(view[key]) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in cells
    )


class _ConcurrentGroup(click.Group):
    """Turns an unreachable broker into a one-line error that shows no password."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            app = getattr(ctx.obj, "app", None)
            if app is None or not isinstance(exc, _broker_errors(app)):
                raise
            url = app.conf.broker_write_url or app.conf.broker_url or ""
            raise click.ClickException(
                f"cannot use the broker at {safe_url(url)}: {mask_urls(str(exc))}"
            ) from None


def _broker_errors(app: Any) -> tuple[type[BaseException], ...]:
    conn = app.connection_for_write()
    try:
        return (OperationalError, *conn.connection_errors, *conn.channel_errors)
    finally:
        conn.release()


@click.group(name="concurrent", cls=_ConcurrentGroup)
@click.pass_context
@handle_preload_options
def concurrent(ctx: click.Context) -> None:
    """Status and control of celery-concurrent function pools."""


@concurrent.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, stable for scripts.")
@click.option(
    "--timeout",
    type=float,
    default=None,
    cls=CeleryOption,
    help="Seconds to wait for nodes (default 1, or 0.5 with --watch).",
)
@click.option(
    "--watch",
    is_flag=True,
    help="A live table, refreshed every --interval seconds, with utilisation and errors "
    "(Ctrl-C to stop). With --json: one JSON list per line.",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, help="Seconds between refreshes."
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="With --watch: stop after this many refreshes.",
)
@click.option(
    "--nodes",
    "by_node",
    is_flag=True,
    help="Under each function, one row per node that serves it, with its pids. "
    "(--json always holds them, in per_node.)",
)
@click.pass_context
def status(
    ctx: click.Context,
    as_json: bool,
    timeout: float | None,
    watch: bool,
    interval: float,
    count: int | None,
    by_node: bool,
) -> None:
    """One row per @concurrent function, over every node that answers: the cluster's
    totals."""
    app = ctx.obj.app
    if watch:
        _watch(app, 0.5 if timeout is None else timeout, interval, count, as_json)
        return
    rows = collect_status(app, 1.0 if timeout is None else timeout)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
    elif by_node:
        click.echo(render_table(node_rows(rows), NODE_COLUMNS))
    else:
        click.echo(render_table(rows))


def _watch(app: Any, timeout: float, interval: float, count: int | None, as_json: bool) -> None:
    # On a terminal each frame replaces the last; piped, frames follow one another.
    clear = "\x1b[2J\x1b[H" if sys.stdout.isatty() else ""
    shown = 0
    try:
        while True:
            began = time.monotonic()
            rows = collect_status(app, timeout)
            if as_json:
                click.echo(json.dumps(rows, sort_keys=True, default=str))
            else:
                table = render_table(rows, WATCH_COLUMNS)
                click.echo(f"{clear}{time.strftime('%H:%M:%S')}\n{table}\n")
            shown += 1
            if count is not None and shown >= count:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        pass


def _bound_options(command: Callable[..., Any]) -> Callable[..., Any]:
    # Both spellings are separate options, so that giving both is refused like in the
    # decorator.
    for name in sorted(RUNTIME_BOUND_NAMES, reverse=True):
        kind = float if name in SECONDS_SETTINGS else int
        command = click.option(f"--{name.replace('_', '-')}", type=kind, default=None)(command)
    return command


@concurrent.command(cls=CeleryCommand)
@click.argument("function")
@_bound_options
@click.option("--timeout", type=float, default=2.0, help="Seconds to wait for nodes.")
@click.pass_context
def update(ctx: click.Context, function: str, timeout: float, **given: Any) -> None:
    """Change a running function's bounds on every node; they apply at once."""
    app = ctx.obj.app
    bounds = {key: value for key, value in given.items() if value is not None}
    specs = specs_of(app)
    if function not in specs:
        raise click.UsageError(str(UnknownFunctionError(function, list(specs))))
    if not bounds:
        raise click.UsageError("give at least one bound to change, e.g. --max-containers 3")
    try:
        specs[function].with_bounds(**bounds)  # validate here: nothing is sent if invalid
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    replies = app.control.broadcast(
        "concurrent_update",
        arguments={"function": function, "bounds": bounds},
        reply=True,
        timeout=timeout,
    )
    if not replies:
        raise click.ClickException("no node answered")
    failed = False
    answered = False
    for reply in replies:
        for node, answer in reply.items():
            if answer.get("skip"):
                continue  # a container, not a supervisor
            answered = True
            if "error" in answer:
                failed = True
                click.echo(f"{node}: error: {answer['error']}", err=True)
            else:
                click.echo(f"{node}: updated {function}: {json.dumps(bounds, sort_keys=True)}")
    if not answered:
        raise click.ClickException("no node supervises @concurrent functions")
    if failed:
        ctx.exit(1)


concurrent.add_command(kubernetes_command)
concurrent.add_command(scaler_command)
