"""What kind of broker an app uses, decided once per app and broker URL.

Redis and AMQP brokers differ in what a container must do to hold no message beyond its
slots, and in what a dead consumer leaves behind: Redis keeps its unacknowledged
messages until ``visibility_timeout``, RabbitMQ requeues them at once.
"""

from __future__ import annotations

import weakref
from typing import Any

from celery import Celery

_kinds: weakref.WeakKeyDictionary[Celery, tuple[Any, str]] = weakref.WeakKeyDictionary()


def broker_kind(app: Celery) -> str:
    """kombu's driver type of the app's broker transport: ``"redis"``, ``"amqp"``, ...

    Reading it opens no connection.
    """
    url = app.conf.broker_read_url or app.conf.broker_url
    known = _kinds.get(app)
    if known is not None and known[0] == url:
        return known[1]
    conn = app.connection_for_read()
    try:
        kind = str(conn.transport.driver_type)
    finally:
        conn.release()
    _kinds[app] = (url, kind)
    return kind


def is_redis(app: Celery) -> bool:
    """Whether the app's broker is Redis (or a Redis-protocol server)."""
    return broker_kind(app) == "redis"


def redis_queue_lengths(channel: Any, queues: list[str]) -> dict[str, int | None]:
    """``LLEN`` of each queue and its priority sub-queues, named as kombu's Redis
    transport names them, in one pipelined round trip."""
    keys = {
        queue: [
            queue if not step else f"{queue}{channel.sep}{step}" for step in channel.priority_steps
        ]
        for queue in queues
    }
    with channel.client.pipeline(transaction=False) as pipe:
        for names in keys.values():
            for name in names:
                pipe.llen(name)
        lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in names) for queue, names in keys.items()}
