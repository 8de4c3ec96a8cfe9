"""Give a dead container's unacknowledged inputs back to their queue at once (Redis).

kombu's Redis transport emulates acknowledgements: a delivered message waits in the
``unacked`` hash (indexed by the ``unacked_index`` sorted set) until its consumer
acknowledges it, and a consumer that dies never does. kombu puts such messages back only
once they are older than the transport's ``visibility_timeout`` (one hour by default).
A container's load reports carry the delivery tags it holds, so when one dies the
supervisor restores exactly those, with kombu's own ``restore_by_tag``: a WATCH/MULTI
transaction that is a no-op for a tag already acknowledged or restored. AMQP brokers
requeue a dead consumer's messages by themselves.

In cluster scope the supervisor also sweeps (:meth:`Redelivery.sweep`): the inputs of a
node that died whole, which no supervisor saw die, are found by their unrenewed
``unacked_index`` scores (``held_messages``) and given back the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from celery import Celery
from celery.utils.log import get_logger
from kombu.exceptions import OperationalError
from kombu.transport.redis import Mutex, MutexHeld
from redis import RedisError

from ..brokers import is_redis
from ..constants import RESTORE_MUTEX_SECONDS
from ..held_messages import HeldMessages
from .broker import OwnChannel

logger = get_logger(__name__)


class Redelivery(OwnChannel):
    """Restores delivery tags over a broker connection of its own, made when first needed."""

    def __init__(self, app: Celery) -> None:
        super().__init__(app)
        self._needed: bool | None = None
        self._held: HeldMessages | None = None

    @property
    def needed(self) -> bool:
        """Whether the broker leaves a dead consumer's messages unacknowledged (Redis)."""
        if self._needed is None:
            self._needed = is_redis(self.app)
        return self._needed

    def restore(self, tags: Sequence[str]) -> int | None:
        """Put the messages of ``tags`` back at the head of their queues.

        Returns how many were still unacknowledged (and so are back now), or ``None``
        when the broker cannot be reached; the caller then tries again later.
        """
        if not tags or not self.needed:
            return 0
        try:
            channel = self._ensure_channel()
            with restorers_mutex(channel):
                return self._restore(channel, tags)
        except MutexHeld:
            return None  # kombu (or another node) is restoring: the next turn tries again
        except self._connection_errors:
            self.close()
            return None

    def _restore(self, channel: Any, tags: Sequence[str]) -> int:
        # The channel's own key names: transport options may rename them. HGET, not
        # HMGET: kombu's client adds a global_keyprefix to the one, not the other.
        with channel.client.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.hget(channel.unacked_key, tag)
            waiting = pipe.execute()
        for tag, payload in zip(tags, waiting, strict=True):
            if payload is not None:
                channel.qos.restore_by_tag(tag)
        return sum(payload is not None for payload in waiting)

    def sweep(self, routing_keys: Iterable[str], older_than: float) -> int | None:
        """Give back the inputs on ``routing_keys`` that no container renewed for
        ``older_than`` seconds: their containers are gone with their node.

        Returns how many went back, or ``None`` when the broker cannot be reached.
        """
        if not self.needed:
            return 0
        try:
            channel = self._ensure_channel()
            if self._held is None:
                self._held = HeldMessages.for_channel(channel)
            # Under kombu's own restore mutex: a tag listed here must not be put back by
            # restore_visible (or another node's sweep) meanwhile and taken by a
            # container before it is put back a second time from a stale list.
            with restorers_mutex(channel):
                tags = self._held.orphans(routing_keys, older_than)
                return self._restore(channel, tags) if tags else 0
        except MutexHeld:
            return 0  # someone else is restoring now: the next sweep looks again
        except self._connection_errors:
            self.close()
            return None

    def close(self) -> None:
        self._held = None
        super().close()

    @property
    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        conn = self._conn or self.app.connection_for_read()
        return (OperationalError, *conn.connection_errors, RedisError, ConnectionError, OSError)


def restorers_mutex(channel: Any) -> Any:
    """kombu's own lock around restoring unacknowledged messages (``restore_visible``
    holds it too), by the channel's key name and expiry; raises ``MutexHeld`` when held.

    Whoever restores from a list read earlier must hold it: a tag restored by another
    meanwhile may already be delivered again, unacknowledged under the same tag, and
    would be put back a second time. It expires after :data:`RESTORE_MUTEX_SECONDS`.
    """
    # Our holds are short (a pipeline, then a transaction per tag): one that a broker
    # restart cut off (its key saved in the snapshot, never released) must not block
    # every restore for kombu's 300 s.
    expire = min(channel.unacked_mutex_expire, RESTORE_MUTEX_SECONDS)
    return Mutex(channel.client, channel.unacked_mutex_key, expire)
