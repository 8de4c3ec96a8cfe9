"""Start container processes: forked from a preloaded fork server, or exec'd.

The fork server imports the app once, and the worker machinery every container imports
while it starts (:data:`CONTAINER_MODULES`); each container then costs a fork and a
broker connection, not an interpreter start and an app import. gevent containers are exec'd
(``celery worker -P gevent``), because gevent must patch the standard library before
anything else is imported.

Every process of a node shares its process group, so a terminal's Ctrl-C (SIGINT) or
Ctrl-\\ (SIGQUIT), or a ``kill`` of the group, reaches the node, the fork server and each
container at once; an orchestrator's SIGTERM reaches every process too. Containers block
SIGINT and SIGQUIT: they are the node's to stop, and its supervisor drains them on a warm
shutdown and kills them on a cold one, exactly as if only the node had been signalled.
SIGTERM stays a container's warm shutdown (what a retirement sends), and SIGKILL cannot be
blocked. The fork server blocks every stop signal (it exits by itself once the node and
its containers have), and whether and how a container exited is known without it anyway
(:class:`_Forked`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ..contract import (
    IDENT_ENV,
    REPORT_ENV,
    REVOKES_ENV,
    SUPERVISOR_PID_ENV,
    report_startup_failure,
)
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


#: what a terminal sends its whole foreground process group (Ctrl-C, Ctrl-\\): a
#: container blocks both and leaves them to its node
NODE_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT})
#: the signals the fork server blocks: it must outlive every container it forked
FORK_SERVER_SIGNALS = NODE_SIGNALS | {signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_blocked(signals: frozenset[signal.Signals]) -> Iterator[None]:
    """Block ``signals`` in this thread for the block. A process started meanwhile
    inherits the mask, across ``exec`` too."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_container(launch: ContainerLaunch, status: Connection | None = None) -> None:
    """The entry point of a forked container (runs in the child).

    ``status`` is the write end of a pipe to the supervisor: the container's exit status
    is the last thing it sends (:class:`_Forked`).
    """
    # Exactly NODE_SIGNALS, not the fork server's mask; before any thread starts, so
    # that every thread of the container inherits it.
    signal.pthread_sigmask(signal.SIG_SETMASK, NODE_SIGNALS)
    os.environ.update(launch.environ())
    from celery.app.utils import find_app

    code = 1
    try:
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
            code = exit_status(exc.code) if isinstance(exc, SystemExit) else 1
            report_startup_failure(exc)  # the supervisor's status then says why
            raise
        worker.start()
        code = exit_status(worker.exitcode)
    finally:
        if status is not None:
            with contextlib.suppress(OSError):
                status.send(code)
    sys.exit(code)


def exit_status(code: object) -> int:
    """The status a process exits with after ``sys.exit(code)``."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


class _Forked:
    """A container forked by the fork server.

    multiprocessing learns a forked child's exit status from the fork server, and reads
    255 once the fork server is gone, however the child is doing: a SIGTERM to the
    node's process group kills the fork server while its containers still drain. A
    container that looked dead then would have its held inputs put back in the queue
    while it still runs them, so they would run twice. Here the container's liveness is
    watched directly (a pidfd on Linux, else the end of file of ``status``), and its exit
    status is what it sent on ``status`` as it exited, or, when it sent nothing (it was
    killed), what the fork server says.
    """

    def __init__(self, process: multiprocessing.process.BaseProcess, status: Connection) -> None:
        self.process = process
        self.pid: int | None = process.pid
        self._status: Connection | None = status
        self._reported: int | None = None
        self._exitcode: int | None = None
        self._gone = False
        self._pidfd = _open_pidfd(process.pid)

    def exitcode(self) -> int | None:
        if self._exitcode is None and (self._gone or not self._alive()):
            self._gone = True
            self._read_status()
            self._exitcode = (
                self._reported if self._reported is not None else self._forkserver_code()
            )
            if self._exitcode is not None:
                self._close()
        return self._exitcode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _alive(self) -> bool:
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            return not readable
        # Without a pidfd: the pipe's end of file. A process the container forked (and
        # did not exec) holds it too, so a container counts as running until it is gone.
        return not self._read_status()

    def _read_status(self) -> bool:
        """Read what the container sent; whether ``status`` is at its end of file."""
        while self._status is not None and self._status.poll(0):
            try:
                self._reported = self._status.recv()
            except (EOFError, OSError):
                self._status.close()
                self._status = None
        return self._status is None

    def _forkserver_code(self) -> int | None:
        # None for a moment, until the fork server has reaped the container; 255 if the
        # fork server is gone.
        return self.process.exitcode

    def _signal(self, signum: int) -> None:
        if self._gone or self._exitcode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif self.pid:
                os.kill(self.pid, signum)

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._status is not None:
            self._status.close()
            self._status = None


def _open_pidfd(pid: int | None) -> int | None:
    """A pidfd of ``pid``: readable once it exits, and never another process's (Linux)."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None  # already gone (and reaped): the pipe's end of file says so
    except OSError:
        return None  # a kernel without pidfds


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

        with _fork_server_shielded():
            forkserver.ensure_running()

    def start(self, launch: ContainerLaunch) -> ContainerProcess:
        if launch.spec.pool == "gevent":
            return self._exec(launch)
        status_r, status_w = self.context.Pipe(duplex=False)
        try:
            process = self.context.Process(
                target=run_container,
                args=(launch, status_w),
                name=f"container {launch.hostname}",
                daemon=False,
            )
            with _fork_server_shielded():  # it starts the fork server again if it died
                process.start()
        except BaseException:
            status_r.close()
            raise
        finally:
            status_w.close()  # the container holds its own copy
        return _Forked(process, status_r)

    def _exec(self, launch: ContainerLaunch) -> ContainerProcess:
        # An exec'd container is the node's own child, so its exit status is reliable;
        # it inherits the blocked NODE_SIGNALS through the fork and the exec.
        with signals_blocked(NODE_SIGNALS):
            popen = subprocess.Popen(
                exec_command(launch), env={**os.environ, **launch.environ(), **exec_env(launch)}
            )
        return _Execed(popen)


@contextlib.contextmanager
def _fork_server_shielded() -> Iterator[None]:
    """A fork server started in the block blocks FORK_SERVER_SIGNALS: it inherits the
    mask through its exec. A stop signal meant for the node, or sent to every process,
    must not kill it under the containers it forked."""
    from multiprocessing import resource_tracker

    # Started first, outside the mask: starting it unblocks SIGINT and SIGTERM in the
    # calling thread, which the fork server would then inherit.
    resource_tracker.ensure_running()
    with signals_blocked(FORK_SERVER_SIGNALS):
        yield


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
