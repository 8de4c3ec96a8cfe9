"""The container bootstep: report load to the supervisor, and exit if it dies.

A container started by a supervisor reports its in-flight count over a Unix datagram
socket whenever it changes (and at least once a second), and watches the supervisor's
PID: if the node's main process is killed, the container drains and exits by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

from celery import bootsteps, signals
from celery.utils.log import get_logger
from celery.worker import state

from ..reports import LoadReport

logger = get_logger(__name__)

REPORT_ENV = "CELERY_CONCURRENT_REPORT_SOCKET"
SUPERVISOR_PID_ENV = "CELERY_CONCURRENT_SUPERVISOR_PID"
IDENT_ENV = "CELERY_CONCURRENT_IDENT"

#: a container whose supervisor died gets this long to drain before it exits hard
ORPHAN_GRACE_SECONDS = 5.0


class LoadReporter(bootsteps.StartStopStep):
    """Worker bootstep of a container that a supervisor started."""

    label = "celery-concurrent load reporter"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.address = os.environ.get(REPORT_ENV)
        self.function = worker.options.get("concurrent_function")
        self.enabled = bool(self.function and self.address)
        self.supervisor_pid = int(os.environ.get(SUPERVISOR_PID_ENV, "0") or 0)
        self.ident = os.environ.get(IDENT_ENV) or str(os.getpid())
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._processed = 0
        self._first_input_at = 0.0
        self._ready = False
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        signals.task_prerun.connect(self._on_prerun, weak=False)
        signals.task_postrun.connect(self._on_postrun, weak=False)
        signals.worker_ready.connect(self._on_ready, weak=False)
        self._thread = threading.Thread(
            target=self._run, name="celery-concurrent-reporter", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        self._changed.set()

    def info(self, worker: Any) -> dict[str, Any]:
        """The container's section of ``inspect stats`` (Flower's worker page shows it)."""
        return {
            "concurrent_container": {
                "function": self.function,
                "ident": self.ident,
                "supervisor_pid": self.supervisor_pid,
                "in_flight": len(state.reserved_requests),
                "processed": self._processed,
            }
        }

    def _on_prerun(self, **_: Any) -> None:
        if not self._first_input_at:
            self._first_input_at = time.monotonic()
        self._changed.set()

    def _on_postrun(self, **_: Any) -> None:
        self._processed += 1
        self._changed.set()

    def _on_ready(self, **_: Any) -> None:
        self._ready = True
        self._changed.set()

    def _run(self) -> None:
        assert self.address is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        busy_at = time.monotonic()
        orphaned_at: float | None = None
        try:
            while not self._stop.is_set():
                self._changed.wait(0.5)
                self._changed.clear()
                in_flight = len(state.reserved_requests)
                now = time.monotonic()
                if in_flight:
                    busy_at = now
                report = LoadReport(
                    ident=self.ident,
                    pid=os.getpid(),
                    in_flight=in_flight,
                    busy_at=busy_at,
                    ready=self._ready,
                    processed=self._processed,
                    first_input_at=self._first_input_at,
                )
                try:
                    sock.sendto(report.encode(), self.address)
                except OSError:
                    pass  # the supervisor is gone or busy; the PID check decides
                if not self._supervisor_alive():
                    if orphaned_at is None:
                        orphaned_at = now
                        logger.warning(
                            "celery-concurrent: supervisor %s is gone; draining and exiting",
                            self.supervisor_pid,
                        )
                        os.kill(os.getpid(), signal.SIGTERM)
                    elif now - orphaned_at > ORPHAN_GRACE_SECONDS:
                        os._exit(1)
        finally:
            sock.close()

    def _supervisor_alive(self) -> bool:
        if not self.supervisor_pid:
            return True
        try:
            os.kill(self.supervisor_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A killed parent may linger as a zombie until reaped; that is not alive.
        try:
            with open(f"/proc/{self.supervisor_pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return True
