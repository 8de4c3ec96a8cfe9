"""The container bootstep that keeps its held messages from re-delivery (Redis).

Every renew interval the container scores the delivery tags it holds (running,
reserved, or waiting for an ETA) with now in kombu's ``unacked_index``
(``held_messages``). So an input that runs longer than ``visibility_timeout`` is never
handed to a second container while this one lives, and the tags of a container whose
whole node died stop being renewed: any live node's sweep gives them back within
seconds, not after ``visibility_timeout``.

It runs in every container on a Redis broker, supervised or standalone
(``--concurrent-function``), on a thread of its own with a broker connection of its
own, so that a busy event loop or a hundred busy threads do not delay it.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from ..brokers import is_redis
from ..coordination import lease_ttl
from ..held_messages import HeldMessages
from .reporter import held_tags

logger = get_logger(__name__)

#: kombu's default ``visibility_timeout`` (one hour)
KOMBU_VISIBILITY_TIMEOUT = 3600.0


class HeldRenewal(bootsteps.StartStopStep):
    """Worker bootstep of a container: renews its held messages' ``unacked_index`` scores."""

    label = "celery-concurrent held-message renewal"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.enabled = bool(worker.options.get("concurrent_function"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self.renewed = 0
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        if not is_redis(worker.app):
            return  # AMQP brokers redeliver only when the consumer is gone
        options = worker.app.conf.broker_transport_options or {}
        self.interval = renew_interval(lease_ttl(worker.app), options)
        self._thread = threading.Thread(
            target=self._run, args=(worker.app,), name="celery-concurrent-held", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, app: Any) -> None:
        held: HeldMessages | None = None
        failing = False
        while not self._stop.wait(self.interval):
            tags = held_tags()
            if not tags:
                continue
            try:
                if held is None:
                    held = self._connect(app)
                self.renewed += len(held.renew(tags))
            except Exception as exc:  # noqa: BLE001 - the next interval tries again
                held = None
                self._close()
                if not failing:
                    logger.warning("celery-concurrent: cannot renew held messages: %s", exc)
                failing = True
                continue
            if failing:
                logger.warning("celery-concurrent: renewing held messages again")
                failing = False
        self._close()

    def _connect(self, app: Any) -> HeldMessages:
        self._conn = app.connection_for_read()
        self._conn.ensure_connection(max_retries=1)
        return HeldMessages.for_channel(self._conn.default_channel)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - tearing down a broken connection
                pass


def renew_interval(ttl: float, transport_options: dict[str, Any]) -> float:
    """How often to renew: a third of a lease, and well within ``visibility_timeout``."""
    visibility = float(transport_options.get("visibility_timeout") or KOMBU_VISIBILITY_TIMEOUT)
    return min(ttl, visibility) / 3
