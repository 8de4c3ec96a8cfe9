"""Taskiq (with taskiq-redis) on the refill and intake work: the peer side of those benchmarks.

It runs in the peers' virtualenv (:mod:`benchmarks.peers`), which has no Celery:

- the worker: ``python -m taskiq worker benchmarks.peer_taskiq:broker ...``;
- the publisher: ``python -m benchmarks.peer_taskiq publish KEY TOTAL SECONDS [ASYNC]``,
  ``.kiq()`` in a loop, as a Taskiq client sends its tasks.

The broker is Taskiq's Redis list queue (``ListQueueBroker``, one ``BRPOP`` per message
like Celery's) with the Redis result backend, on the Redis in ``PEER_REDIS_URL``. The
tasks record themselves as ours do (:mod:`benchmarks.stamps`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import redis
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from benchmarks import stamps

URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "bench.taskiq"

broker = ListQueueBroker(URL, queue_name=QUEUE).with_result_backend(
    RedisAsyncResultBackend(URL, result_ex_time=600)
)
_client = redis.Redis.from_url(URL)


@broker.task(task_name="bench.sleep_sync")
def sleep_sync(key: str, total: int, seconds: float) -> int:
    """``time.sleep``: Taskiq runs a sync task on its thread pool."""
    started = time.time()
    time.sleep(seconds)
    stamps.stamp(_client, key, total, started)
    return total


@broker.task(task_name="bench.sleep_async")
async def sleep_async(key: str, total: int, seconds: float) -> int:
    started = time.time()
    if seconds:
        await asyncio.sleep(seconds)
    stamps.stamp(_client, key, total, started)
    return total


async def publish(key: str, total: int, seconds: float, is_async: bool) -> None:
    task = sleep_async if is_async else sleep_sync
    await broker.startup()
    try:
        for _ in range(total):
            await task.kiq(key, total, seconds)
    finally:
        await broker.shutdown()


if __name__ == "__main__":
    _, command, key, total, seconds, *rest = sys.argv
    assert command == "publish", sys.argv
    asyncio.run(publish(key, int(total), float(seconds), bool(rest and rest[0] == "async")))
