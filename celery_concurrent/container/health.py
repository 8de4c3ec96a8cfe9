"""The container bootstep that keeps the files a pod's probes read.

Kubernetes asks a pod, every few seconds, whether it lives and whether it is ready. The
usual answer for a Celery worker (``celery inspect ping``) costs a broker round trip and
a Python start per probe; here a probe reads a file instead (``test -f``, ``stat``):

- ``alive`` is rewritten every :data:`TOUCH_INTERVAL` by a thread of the container: a
  process that stops running its threads stops renewing it, and the liveness probe
  restarts the pod;
- ``ready`` exists from ``worker_ready`` (the container consumes its queue) until its
  shutdown begins (it takes nothing new while it drains).

It runs only where :data:`HEALTH_ENV` names the directory (the generated Deployment
sets it), supervised or not.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from celery import bootsteps, signals

#: the directory the probe files go in; unset: no probe files
HEALTH_ENV = "CELERY_CONCURRENT_HEALTH_DIR"
ALIVE_FILE = "alive"
READY_FILE = "ready"
#: seconds between two writes of ``alive`` (the liveness probe allows 60)
TOUCH_INTERVAL = 5.0


class HealthFiles(bootsteps.StartStopStep):
    """Worker bootstep of a container: the ``alive`` and ``ready`` files of its probes."""

    label = "celery-concurrent probe files"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        directory = os.environ.get(HEALTH_ENV)
        self.enabled = bool(worker.options.get("concurrent_function") and directory)
        self.directory = Path(directory or ".")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / READY_FILE).unlink(missing_ok=True)
        self._touch()
        signals.worker_ready.connect(self._on_ready, weak=False)
        self._thread = threading.Thread(target=self._run, name="celery-concurrent-health")
        self._thread.daemon = True
        self._thread.start()

    def stop(self, worker: Any) -> None:
        # Not ready from the start of the shutdown: it drains and takes nothing new.
        (self.directory / READY_FILE).unlink(missing_ok=True)
        self._stop.set()

    def _on_ready(self, **_: Any) -> None:
        if not self._stop.is_set():
            (self.directory / READY_FILE).write_text(str(os.getpid()))

    def _run(self) -> None:
        while not self._stop.wait(TOUCH_INTERVAL):
            self._touch()

    def _touch(self) -> None:
        with contextlib.suppress(OSError):
            (self.directory / ALIVE_FILE).write_text(str(os.getpid()))
