"""Probes: the backlog of a function's queue, read from the broker.

On Redis, kombu's passive ``queue_declare`` is ``LLEN`` over the queue and its priority
sub-queues; on RabbitMQ it is the broker's own message count. Containers never hold a
message beyond their free slots, so this is the true backlog.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.utils.log import get_logger
from kombu.exceptions import ChannelError, OperationalError

from ..redact import mask_urls

logger = get_logger(__name__)

#: after the broker could not be reached, the probe tries again this much later (each
#: failed attempt may cost a connect timeout, and every function's backlog asks)
RECONNECT_INTERVAL = 0.5


class BacklogProbe:
    """Reads queue lengths over one broker connection of its own."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._conn: Any = None
        self._channel: Any = None
        self._errors: tuple[type[BaseException], ...] | None = None
        #: when the broker was first found unreachable, while it still is
        self.unreachable_since: float | None = None
        self._retry_at = 0.0

    def _ensure_channel(self) -> Any:
        if self._channel is None:
            self._conn = self.app.connection_for_read()
            # One quick attempt: the next turn tries again.
            self._conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            self._channel = self._conn.channel()
        return self._channel

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """What the transport raises when the broker is unreachable (redis-py's own too)."""
        if self._errors is None:
            conn = self.app.connection_for_read()
            try:
                self._errors = (
                    *conn.connection_errors,
                    OperationalError,
                    ConnectionError,
                    OSError,
                )
            finally:
                conn.release()
        return self._errors

    def backlog(self, queue: str) -> int | None:
        """Messages waiting in ``queue``; 0 if it does not exist, ``None`` if unreachable."""
        now = time.monotonic()
        if self.unreachable_since is not None and now < self._retry_at:
            return None
        try:
            channel = self._ensure_channel()
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
        except ChannelError:
            # Missing queue: nothing waits. AMQP closes the channel on a 404.
            if self._conn is not None and self._conn.transport.driver_type != "redis":
                self._reset_channel()
            count = 0
        except self.connection_errors as exc:
            self.close()
            self._retry_at = now + RECONNECT_INTERVAL
            if self.unreachable_since is None:
                self.unreachable_since = now
                # Once per outage, not once a turn.
                logger.warning(
                    "celery-concurrent: the broker is unreachable (%s); scaling paused, "
                    "the containers keep running",
                    mask_urls(str(exc)),
                )
            return None
        if self.unreachable_since is not None:
            logger.warning(
                "celery-concurrent: the broker is reachable again after %.1fs; scaling resumed",
                now - self.unreachable_since,
            )
            self.unreachable_since = None
        return int(count)

    def _reset_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - already closed by the broker
                pass

    def close(self) -> None:
        self._channel = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - tearing down a broken connection
                pass
