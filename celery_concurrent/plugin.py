"""``install(app)``: plug celery-concurrent into a Celery app through Celery's own seams.

It appends the router to ``task_routes``, adds the ``celery worker`` options, and turns
a worker started with ``--concurrent-function`` into a container (``worker_init``).
Decorating a task installs the plugin on the task's app; calling it again is harmless.
"""

from __future__ import annotations

import weakref
from typing import Any

import click
from celery import Celery, signals
from celery._state import connect_on_app_finalize
from celery.utils.log import get_logger

from .constants import (
    CONTAINERS_PER_CPU,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SCOPE,
    MEMORY_PER_CONTAINER,
    SCOPES,
)
from .container.health import HealthFiles
from .container.heartbeat import LeaseHeartbeat
from .container.held_renewal import HeldRenewal
from .container.intake import RedisIntake
from .container.prefetch_gate import PrefetchGate
from .container.reporter import LoadReporter
from .container.revokes import RevokeSync
from .container.worker import configure_container
from .coordination import SCOPE_SETTING
from .errors import ConcurrentError, ConfigurationError, UnknownFunctionError
from .registry import adopt_async_run, adopt_batched_run, spec_of, specs_of
from .routing import ensure_router
from .supervisor import control  # noqa: F401 - registers the remote control commands
from .supervisor.bootstep import SupervisorStep
from .supervisor.gpus import GPUS_ENV, GPUS_OPTION, gpu_override
from .supervisor.metrics import MetricsStep

logger = get_logger(__name__)

_installed: weakref.WeakSet[Celery] = weakref.WeakSet()


def _check_gpus(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Refused while the command line is read, before the worker starts anything; the
    # supervisor step checks again for workers started without the command line.
    try:
        gpu_override(value)
    except ConfigurationError as exc:
        if exc.parameter == GPUS_OPTION:
            raise click.BadParameter(str(exc), ctx, param) from exc
        raise click.UsageError(str(exc), ctx) from exc
    return value


WORKER_OPTIONS = (
    click.Option(
        ["--concurrent-function"],
        default=None,
        help="Run this worker as one container of the named @concurrent task: it "
        "consumes only that function's queue and runs its inputs concurrently.",
    ),
    click.Option(
        ["--without-concurrent"],
        is_flag=True,
        default=False,
        help="Do not supervise @concurrent functions on this node.",
    ),
    click.Option(
        ["--concurrent-functions"],
        default=None,
        help="Comma-separated task names: supervise only these @concurrent functions "
        "on this node (default: all of them).",
    ),
    click.Option(
        ["--concurrent-max-containers"],
        type=click.IntRange(min=1),
        default=None,
        help=f"The node-wide bound on containers (default: {CONTAINERS_PER_CPU} per CPU, at "
        f"most one per {MEMORY_PER_CONTAINER >> 20} MiB of memory).",
    ),
    click.Option(
        [GPUS_OPTION],
        default=None,
        callback=_check_gpus,
        help='This node\'s GPUs as "INDEX:MODEL,..." (e.g. "0:A100,1:A100"); "" means '
        f"none. Overrides {GPUS_ENV} and detection with nvidia-smi.",
    ),
    click.Option(
        ["--concurrent-poll-interval"],
        type=click.FloatRange(min=0.005, max=5.0),
        default=None,
        help=f"Seconds between the supervisor's backlog reads (default {DEFAULT_POLL_INTERVAL:g}).",
    ),
    click.Option(
        ["--concurrent-metrics-port"],
        type=click.IntRange(min=0, max=65535),
        default=None,
        help="Serve Prometheus metrics of the function pools on this port "
        "(default: none; 0 picks a free port).",
    ),
    click.Option(
        ["--concurrent-scope"],
        type=click.Choice(SCOPES),
        default=None,
        help=f"Where each function's bounds hold: 'cluster', over every node on the broker "
        f"(leases in Redis), or 'node', on each node alone (default: the {SCOPE_SETTING} "
        f"setting, else {DEFAULT_SCOPE}).",
    ),
    click.Option(
        ["--concurrent-metrics-address"],
        default=None,
        help=f"The address the metrics endpoint binds (default {DEFAULT_METRICS_ADDRESS}).",
    ),
)


def install(app: Celery) -> Celery:
    """Install celery-concurrent on ``app``. Idempotent; returns the app."""
    if app in _installed:
        if app.configured:
            ensure_router(app)
        return app
    _installed.add(app)
    if app.configured:
        ensure_router(app)
    app.on_after_configure.connect(_on_configured, sender=app, weak=False)
    app.on_after_finalize.connect(_on_finalized, sender=app, weak=False)
    for option in WORKER_OPTIONS:
        app.user_options["worker"].add(option)
    app.steps["worker"].add(SupervisorStep)
    app.steps["worker"].add(LoadReporter)
    app.steps["worker"].add(HeldRenewal)
    app.steps["worker"].add(LeaseHeartbeat)
    app.steps["worker"].add(HealthFiles)
    app.steps["consumer"].add(PrefetchGate)
    app.steps["consumer"].add(RedisIntake)
    app.steps["consumer"].add(RevokeSync)
    app.steps["worker"].add(MetricsStep)
    return app


def _on_configured(sender: Celery, **_: Any) -> None:
    ensure_router(sender)


def _on_finalized(sender: Celery, **_: Any) -> None:
    ensure_router(sender)
    for task in sender.tasks.values():
        spec = spec_of(task)  # validates task options too
        if spec is not None:
            adopt_batched_run(task, spec.batch_settings)
            adopt_async_run(task)


@connect_on_app_finalize
def _install_when_decorated(app: Celery) -> None:
    # Apps finalized later with @concurrent tasks that no decorator saw being made.
    if app not in _installed:
        app.on_after_finalize.connect(_install_if_used, sender=app, weak=False)


def _install_if_used(sender: Celery, **_: Any) -> None:
    if sender not in _installed and specs_of(sender):
        install(sender)
        _on_finalized(sender)


@signals.worker_init.connect
def _make_container(sender: Any, **_: Any) -> None:
    worker = sender
    name = worker.options.get("concurrent_function")
    if not name or worker.app not in _installed:
        return
    # Celery logs and swallows exceptions from signal handlers; a container that cannot
    # be configured must not carry on as a plain worker, so it exits instead.
    try:
        specs = specs_of(worker.app)
        if name not in specs:
            raise UnknownFunctionError(name, list(specs))
        configure_container(worker, specs[name], ident=worker.options.get("concurrent_ident"))
    except ConcurrentError as exc:
        logger.critical("celery-concurrent: cannot start the container: %s", exc)
        raise SystemExit(f"celery-concurrent: {exc}") from exc
