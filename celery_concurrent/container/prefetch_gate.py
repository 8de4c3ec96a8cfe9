"""The prefetch gate of a container on RabbitMQ (and other AMQP-like brokers).

With early acks an input is acknowledged when it starts, so a plain prefetch of N lets
the broker deliver N more while N run. The gate keeps ``prefetch = N - running`` and
cancels the consumer while every slot is busy, so a container holds no message beyond
its slots and the queue's length stays the true backlog. Inputs are accepted (and so
acked) on the event loop's thread, right after the window shrank: the broker never sees
a freed place in the old window, and the AMQP channel is used from one thread only.
Redis containers use Celery's ``worker_disable_prefetch`` instead, and ``acks_late``
functions need no gate: their running inputs count against the window until they finish.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from ..brokers import is_redis

logger = get_logger(__name__)


class PrefetchGate(bootsteps.StartStopStep):
    """Consumer bootstep: match the prefetch window to the container's free slots."""

    label = "celery-concurrent prefetch gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, concurrent_function: str | None = None, **kwargs: Any):
        self.enabled = bool(concurrent_function)
        self.function = concurrent_function
        self.consumer: Any = None
        self.consuming = True
        self.prefetch: int | None = None
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        if is_redis(consumer.app):
            return
        task = consumer.app.tasks.get(self.function)
        if task is not None and task.acks_late:
            # Its inputs stay unacknowledged while they run, so they fill the broker's
            # window themselves: a prefetch of N already holds none beyond the slots.
            return
        slots = getattr(consumer.pool, "slots", None)
        if slots is None:
            return
        self.consumer = consumer
        self.consuming = True
        self.prefetch = None
        slots.on_wake(self.reconcile)
        slots.accept_on_loop = True
        self.reconcile(slots.running)

    def reconcile(self, running: int) -> None:
        consumer = self.consumer
        if consumer is None or consumer.task_consumer is None:
            return
        free = consumer.pool.limit - running
        if free <= 0:
            if self.consuming:
                consumer.task_consumer.cancel()
                self.consuming = False
            return
        if free != self.prefetch:
            consumer.qos.value = free
            consumer.qos.update()
            self.prefetch = free
        if not self.consuming:
            consumer.task_consumer.consume()
            self.consuming = True

    def stop(self, consumer: Any) -> None:
        slots = getattr(consumer.pool, "slots", None)
        if slots is not None:
            slots.accept_on_loop = False
        self.consumer = None
