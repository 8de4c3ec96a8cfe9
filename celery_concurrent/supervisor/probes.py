"""Probes: the backlog of a function's queue, read from the broker.

On Redis, kombu's passive ``queue_declare`` is ``LLEN`` over the queue and its priority
sub-queues; on RabbitMQ it is the broker's own message count. Containers never hold a
message beyond their free slots, so this is the true backlog.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.utils.log import get_logger
from kombu.exceptions import ChannelError, OperationalError

logger = get_logger(__name__)


class BacklogProbe:
    """Reads queue lengths over one broker connection of its own."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._conn: Any = None
        self._channel: Any = None

    def _ensure_channel(self) -> Any:
        if self._channel is None:
            self._conn = self.app.connection_for_read()
            self._conn.ensure_connection(max_retries=1)
            self._channel = self._conn.channel()
        return self._channel

    def backlog(self, queue: str) -> int | None:
        """Messages waiting in ``queue``; 0 if it does not exist, ``None`` if unreachable."""
        try:
            channel = self._ensure_channel()
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
            return int(count)
        except ChannelError:
            # Missing queue: nothing waits. AMQP closes the channel on a 404.
            if self._conn is not None and self._conn.transport.driver_type != "redis":
                self._reset_channel()
            return 0
        except (OperationalError, ConnectionError, OSError) as exc:
            logger.warning("celery-concurrent: cannot read the backlog of %s: %s", queue, exc)
            self.close()
            return None

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
