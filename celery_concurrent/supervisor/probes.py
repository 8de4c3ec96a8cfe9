"""Probes: the backlog of a function's queue, read from the broker.

On Redis it is ``LLEN`` over the queue and its priority sub-queues, every function's
queues in one pipelined round trip per turn; on RabbitMQ it is a passive
``queue_declare``, the broker's own message count. Containers never hold a message
beyond their free slots, so this is the true backlog.
"""

from __future__ import annotations

import time

from celery import Celery
from celery.utils.log import get_logger
from kombu.exceptions import ChannelError, OperationalError

from ..brokers import is_redis, redis_queue_lengths
from ..constants import RECONNECT_INTERVAL
from ..redact import mask_urls
from .broker import OwnChannel

logger = get_logger(__name__)


class BacklogProbe(OwnChannel):
    """Reads queue lengths over one broker connection of its own."""

    def __init__(self, app: Celery) -> None:
        super().__init__(app)
        self._errors: tuple[type[BaseException], ...] | None = None
        #: when the broker was first found unreachable, while it still is
        self.unreachable_since: float | None = None
        self._retry_at = 0.0

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

    def backlogs(self, queues: list[str]) -> dict[str, int | None]:
        """The backlog of each queue (``None`` for all while the broker is unreachable)."""
        now = time.monotonic()
        if self.unreachable_since is not None and now < self._retry_at:
            return dict.fromkeys(queues)
        try:
            channel = self._ensure_channel()
        except self.connection_errors as exc:
            self._unreachable(now, exc)
            return dict.fromkeys(queues)
        if not is_redis(self.app):
            return {queue: self.backlog(queue) for queue in queues}
        try:
            counts = redis_queue_lengths(channel, queues)
        except self.connection_errors as exc:
            self._unreachable(now, exc)
            return dict.fromkeys(queues)
        self._reachable(now)
        return counts

    def _unreachable(self, now: float, exc: BaseException) -> None:
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

    def _reachable(self, now: float) -> None:
        if self.unreachable_since is not None:
            logger.warning(
                "celery-concurrent: the broker is reachable again after %.1fs; scaling resumed",
                now - self.unreachable_since,
            )
            self.unreachable_since = None

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
            if not is_redis(self.app):
                self._reset_channel()
            count = 0
        except self.connection_errors as exc:
            self._unreachable(now, exc)
            return None
        self._reachable(now)
        return int(count)

    def _reset_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - already closed by the broker
                pass
