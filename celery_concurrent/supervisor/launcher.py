"""Start container processes: forked from a preloaded fork server, or exec'd.

The fork server imports the app once, and the worker machinery every container imports
while it starts (:data:`CONTAINER_MODULES`); each container then costs a fork and a
broker connection, not an interpreter start and an app import. gevent containers are exec'd
(``celery worker -P gevent``), because gevent must patch the standard library before
anything else is imported.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..container.reporter import (
    IDENT_ENV,
    REPORT_ENV,
    SUPERVISOR_PID_ENV,
    report_startup_failure,
)
from ..contract import REVOKES_ENV
from ..spec import FunctionSpec


@dataclass(frozen=True)
class ContainerLaunch:
    """What a container needs to know to start."""

    app_ref: str
    spec: FunctionSpec
    ident: str
    hostname: str
    report_address: str
    supervisor_pid: int
    revokes_address: str = ""
    loglevel: str = "WARNING"
    logfile: str | None = None
    task_events: bool = False
    #: settings the node's command line may have changed (broker URL, backend, ...);
    #: never in a repr, since the URLs may carry passwords
    conf: dict[str, Any] = field(default_factory=dict, repr=False)
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        return {
            REPORT_ENV: self.report_address,
            SUPERVISOR_PID_ENV: str(self.supervisor_pid),
            IDENT_ENV: self.ident,
            REVOKES_ENV: self.revokes_address,
            **self.env,
        }


class ContainerProcess(Protocol):
    pid: int | None

    def exitcode(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


def run_container(launch: ContainerLaunch) -> None:
    """The entry point of a forked container (runs in the child)."""
    os.environ.update(launch.environ())
    from celery.app.utils import find_app

    try:
        app = find_app(launch.app_ref)
        if launch.conf:
            app.conf.update(launch.conf)
        worker = app.Worker(
            hostname=launch.hostname,
            loglevel=launch.loglevel,
            logfile=launch.logfile,
            task_events=launch.task_events,
            concurrent_function=launch.spec.name,
            concurrent_ident=launch.ident,
            quiet=True,
        )
    except BaseException as exc:
        report_startup_failure(exc)  # the supervisor's status then says why
        raise
    worker.start()
    sys.exit(worker.exitcode or 0)


class _Forked:
    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.pid: int | None = process.pid

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.pid and self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class _Execed:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid: int | None = popen.pid

    def exitcode(self) -> int | None:
        return self.popen.poll()

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()


#: Modules a container imports on its way to its first input, imported once by the fork
#: server, after the app. Left to each container they cost about 30 ms of every cold
#: start (``benchmarks/bench_reaction.py``). The fork server skips any that fail to import.
CONTAINER_MODULES = (
    "celery.apps.worker",
    "celery.worker.components",
    "celery.worker.consumer",
    "celery.worker.autoscale",
    "celery.worker.pidbox",
    "celery.worker.strategy",
    "celery.worker.loops",
    "celery.worker.heartbeat",
    "celery.app.amqp",
    "celery.app.control",
    "celery.app.events",
    "celery.app.log",
    "celery.app.routes",
    "celery.events.receiver",
    "celery.concurrency.thread",
    "billiard.pool",
    "kombu.transport.virtual",
    "kombu.transport.redis",
    "kombu.transport.pyamqp",
    "celery_concurrent.container.thread_pool",
    "celery_concurrent.container.aio_pool",
)


class Launcher:
    """Starts containers; one per node, shared by every function."""

    def __init__(self, preload: list[str]) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(
            ["celery_concurrent.supervisor.launcher", *preload, *CONTAINER_MODULES]
        )

    def warm_up(self) -> None:
        """Start the fork server now, so that the first container does not wait for it."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def start(self, launch: ContainerLaunch) -> ContainerProcess:
        if launch.spec.pool == "gevent":
            return self._exec(launch)
        process = self.context.Process(
            target=run_container, args=(launch,), name=f"container {launch.hostname}", daemon=False
        )
        process.start()
        return _Forked(process)

    def _exec(self, launch: ContainerLaunch) -> ContainerProcess:
        return _Execed(
            subprocess.Popen(
                exec_command(launch), env={**os.environ, **launch.environ(), **exec_env(launch)}
            )
        )


def exec_env(launch: ContainerLaunch) -> dict[str, str]:
    """The URLs an exec'd container needs, in its environment: a command line is visible
    to every user of the machine (``ps``), and the URLs may carry passwords."""
    env = {}
    if launch.conf.get("broker_url"):
        env["CELERY_BROKER_URL"] = str(launch.conf["broker_url"])
    if launch.conf.get("result_backend"):
        env["CELERY_RESULT_BACKEND"] = str(launch.conf["result_backend"])
    return env


def exec_command(launch: ContainerLaunch) -> list[str]:
    """The ``celery worker`` command line of a container started by exec."""
    cmd = [sys.executable, "-m", "celery", "-A", launch.app_ref]
    cmd += ["worker", "-n", launch.hostname, "-l", launch.loglevel]
    cmd += ["--concurrent-function", launch.spec.name]
    if launch.spec.pool == "gevent":
        cmd += ["-P", "gevent"]
    if launch.task_events:
        cmd.append("-E")
    if launch.logfile:
        cmd += ["-f", launch.logfile]
    return cmd
