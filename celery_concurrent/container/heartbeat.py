"""The container bootstep that puts a standalone container's load into its function's leases.

A supervised container's node holds its lease and writes its load (``supervisor/cluster``).
A standalone one (``celery worker --concurrent-function NAME`` with no supervisor, the
pod of a Kubernetes Deployment) has no node to do it, so it does it itself, on a cluster
with a coordination Redis:

- at start it takes its own lease, member = its node name, with ``limit=None``: the bound
  there is KEDA's ``maxReplicaCount``, which never starts more pods than it allows;
- it writes its load (in flight, idle time, ready) whenever it changes, at most every
  :data:`WRITE_INTERVAL`, and renews every ``lease_ttl / 3`` at the latest; a lease
  that lapsed (Redis restarted without its data) is taken again;
- it drops the lease when it stops.

So the demand endpoint (``scaler.py``) and every node see its inputs. Supervised
containers (``CELERY_CONCURRENT_REPORT_SOCKET`` set) never run it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Any

from celery import bootsteps, signals
from celery.utils.log import get_logger
from celery.worker import state

from ..contract import REPORT_ENV
from ..coordination import configured_scope, coordination_store, lease_ttl
from ..leases import ContainerLeases, ContainerLoad, spec_digest
from ..redact import mask_urls
from ..registry import specs_of

logger = get_logger(__name__)

#: the shortest time between two load writes of a busy container
WRITE_INTERVAL = 0.1


class LeaseHeartbeat(bootsteps.StartStopStep):
    """Worker bootstep of a standalone container: its lease and load record."""

    label = "celery-concurrent lease heartbeat"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.function = worker.options.get("concurrent_function")
        self.enabled = bool(self.function and not os.environ.get(REPORT_ENV))
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = False
        self.leases: ContainerLeases | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        app = worker.app
        store = coordination_store(app)
        if store is None or configured_scope(app, None) != "cluster":
            return
        spec = specs_of(app)[self.function]
        self.member = worker.hostname
        self.ttl = lease_ttl(app)
        self._load = ContainerLoad(
            node=worker.hostname,
            in_flight=0,
            idle_s=0.0,
            ready=False,
            spec_digest=spec_digest(spec),
            max_containers=spec.max_containers,
        )
        self.leases = ContainerLeases(store.client(), spec.name, store.prefix)
        for signal in (signals.task_received, signals.task_postrun, signals.worker_ready):
            signal.connect(self._on_change, weak=False)
        self._thread = threading.Thread(target=self._run, name="celery-concurrent-lease")
        self._thread.daemon = True
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(5)

    def _on_change(self, sender: Any = None, signal: Any = None, **_: Any) -> None:
        if signal is signals.worker_ready:
            self._ready = True
        self._changed.set()

    def _run(self) -> None:
        assert self.leases is not None
        renew_every = self.ttl / 3
        busy_at = time.monotonic()
        held = failing = False
        while not self._stop.is_set():
            self._changed.wait(renew_every)
            self._stop.wait(WRITE_INTERVAL)  # coalesce a burst of changes into one write
            self._changed.clear()
            in_flight = len(state.reserved_requests)
            now = time.monotonic()
            if in_flight:
                busy_at = now
            load = replace(self._load, in_flight=in_flight, idle_s=now - busy_at, ready=self._ready)
            try:
                held = (held and self.leases.renew(self.member, self.ttl, load)) or (
                    self.leases.acquire(self.member, None, self.ttl, load)
                )
            except Exception as exc:  # noqa: BLE001 - the next interval tries again
                if not failing:
                    logger.warning(
                        "celery-concurrent: cannot write this container's lease: %s",
                        mask_urls(str(exc)),
                    )
                held, failing = False, True
                continue
            failing = False
        self._drop()

    def _drop(self) -> None:
        assert self.leases is not None
        try:
            self.leases.drop(self.member)
        except Exception as exc:  # noqa: BLE001 - it lapses within a TTL anyway
            logger.warning("celery-concurrent: cannot drop this container's lease: %s", exc)
        self.leases.client.close()
