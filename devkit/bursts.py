"""A queue full of inputs at one instant, however long publishing them took.

Publish the inputs once into a Redis list, the template (:func:`publish_template`), then
copy it into the queue (:func:`burst`) as often as a run needs.
"""

from __future__ import annotations

import time
from typing import Any

import redis


def publish_template(
    app: Any, rds: redis.Redis, task_name: str, args: tuple[Any, ...], total: int, template: str
) -> list[Any]:
    """Publish ``total`` inputs once into the Redis list ``template``, for :func:`burst`;
    return their results (``AsyncResult``).

    The messages name the template as their routing key; the Redis transport delivers
    a message to the queue it was popped from, whatever its routing key says.
    """
    task = app.tasks[task_name]
    rds.delete(template)
    with app.producer_or_acquire() as producer:
        results = [
            task.apply_async(args, producer=producer, queue=template, routing_key=template)
            for _ in range(total)
        ]
    assert rds.llen(template) == total, (template, rds.llen(template))
    return results


def burst(rds: redis.Redis, template: str, queue: str) -> float:
    """Put a whole template of inputs in ``queue`` at once; return ``time.time()`` then.

    ``COPY`` makes the queue in one step, so the burst arrives at one instant; a worker
    blocked on ``BRPOP`` wakes at once.
    """
    began = time.time()
    rds.copy(template, queue, replace=True)
    return began
