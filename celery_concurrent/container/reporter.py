"""The container bootstep: report load to the supervisor, and exit if it dies.

A container started by a supervisor reports its in-flight count over a Unix datagram
socket whenever it changes (and at least once a second), and watches the supervisor's
PID: if the node's main process is killed, the container drains and exits by itself.
On Redis the report also carries the delivery tags of the messages the container holds
unacknowledged, so that its supervisor can put them back in the queue the moment the
container dies (a SIGKILL, a segfault), not an hour later when the transport's
``visibility_timeout`` expires.
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

from ..brokers import is_redis
from ..constants import (
    HELD_REPORT_COST_RATIO,
    HELD_REPORT_INTERVAL,
    HELD_REPORT_THRESHOLD,
    MAX_HELD_TAGS,
    ORPHAN_GRACE_SECONDS,
    REPORT_INTERVAL,
    SUPERVISOR_CHECK_INTERVAL,
)
from ..contract import IDENT_ENV, REPORT_ENV, SUPERVISOR_PID_ENV, LoadReport
from .batches import STATS as BATCH_STATS

logger = get_logger(__name__)


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
        self._ready = False
        self._held: tuple[str, ...] = ()
        self.reports_held = False
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        # Only Redis needs the tags: AMQP brokers requeue a dead consumer's messages.
        self.reports_held = is_redis(worker.app)
        signals.task_received.connect(self._on_received, weak=False)
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

    def _on_received(self, **_: Any) -> None:
        self._changed.set()

    def _on_prerun(self, **_: Any) -> None:
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
        sent_at = 0.0
        checked_at = 0.0
        cost = 0.0  # CPU seconds the last report took
        try:
            while not self._stop.is_set():
                self._changed.wait(0.5)
                # A busy container changes with every input; a report every
                # REPORT_INTERVAL at most keeps its cost and the supervisor's flat.
                self._stop.wait(max(0.0, sent_at + REPORT_INTERVAL - time.monotonic()))
                if self.reports_held and len(state.reserved_requests) > HELD_REPORT_THRESHOLD:
                    # Coalesce a busy container's changes: a hundred reports a second
                    # at most, however fast its inputs come and go.
                    pause = max(HELD_REPORT_INTERVAL, HELD_REPORT_COST_RATIO * cost)
                    self._stop.wait(max(0.0, sent_at + pause - time.monotonic()))
                self._changed.clear()
                began = time.thread_time()
                in_flight = len(state.reserved_requests)
                if self.reports_held:
                    held = held_tags() if in_flight else ()
                    if held is not None:
                        self._held = held
                now = time.monotonic()
                if in_flight:
                    busy_at = now
                report = LoadReport(
                    ident=self.ident,
                    pid=os.getpid(),
                    in_flight=in_flight,
                    busy_at=busy_at,
                    ready=self._ready,
                    held=self._held,
                    **BATCH_STATS.report_fields(),
                )
                try:
                    sock.sendto(report.encode(), self.address)
                except OSError:
                    pass  # the supervisor is gone or busy; the PID check decides
                sent_at = time.monotonic()
                cost = time.thread_time() - began
                if now - checked_at < SUPERVISOR_CHECK_INTERVAL:
                    continue
                checked_at = now
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


def held_tags() -> tuple[str, ...] | None:
    """Delivery tags of the messages this worker holds and has not acknowledged.

    Those are its reserved inputs (running, or about to run) and those waiting for an
    ETA; with ``acks_late`` a running input stays unacknowledged until it finishes.
    """
    for _ in range(3):
        try:
            requests = [*state.reserved_requests, *state.scheduled_requests]
        except RuntimeError:  # the consumer's thread changed the set while we copied it
            continue
        tags: list[str] = []
        for request in requests:
            message = request.message
            if not message.acknowledged and message.delivery_tag is not None:
                tags.append(str(message.delivery_tag))
                if len(tags) >= MAX_HELD_TAGS:
                    break
        return tuple(tags)
    return None  # keep the last report's tags
