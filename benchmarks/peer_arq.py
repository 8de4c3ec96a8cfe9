"""arq on the refill and intake work: the peer side of those benchmarks.

It runs in the peers' virtualenv (:mod:`benchmarks.peers`), which has no Celery:

- the worker: ``python -m arq benchmarks.peer_arq.WorkerSettings`` (``ARQ_MAX_JOBS``
  jobs at once);
- the publisher: ``python -m benchmarks.peer_arq publish KEY TOTAL SECONDS [async]``,
  ``enqueue_job`` in a loop.

arq runs only coroutines: the sync work (``time.sleep``) goes to a thread of the loop's
executor, sized to ``max_jobs``, as arq's documentation does for blocking code. arq
keeps results (an hour by default; 600 s here) and polls its queue every ``poll_delay``
(0.5 s by default, kept: users run it so). The tasks record themselves as ours do
(:mod:`benchmarks.stamps`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import ConnectionPool

from benchmarks import stamps

URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "bench.arq"
MAX_JOBS = int(os.environ.get("ARQ_MAX_JOBS", "10"))

_client = redis.Redis.from_url(URL)


async def sleep_sync(ctx: dict[str, Any], key: str, total: int, seconds: float) -> int:
    started = time.time()
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, seconds)
    stamps.stamp(_client, key, total, started)
    return total


async def sleep_async(ctx: dict[str, Any], key: str, total: int, seconds: float) -> int:
    started = time.time()
    if seconds:
        await asyncio.sleep(seconds)
    stamps.stamp(_client, key, total, started)
    return total


async def startup(ctx: dict[str, Any]) -> None:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(MAX_JOBS))


class WorkerSettings:
    functions = [sleep_sync, sleep_async]
    redis_settings = RedisSettings.from_dsn(URL)
    queue_name = QUEUE
    # redis-py caps a pool at 100 connections; each running job may hold one.
    redis_pool = ArqRedis(
        connection_pool=ConnectionPool.from_url(URL, max_connections=MAX_JOBS + 100)
    )
    max_jobs = MAX_JOBS
    keep_result = 600
    on_startup = startup


async def publish(key: str, total: int, seconds: float, is_async: bool) -> None:
    pool = await create_pool(WorkerSettings.redis_settings, default_queue_name=QUEUE)
    name = "sleep_async" if is_async else "sleep_sync"
    try:
        for _ in range(total):
            await pool.enqueue_job(name, key, total, seconds)
    finally:
        await pool.aclose()


if __name__ == "__main__":
    _, command, key, total, seconds, *rest = sys.argv
    assert command == "publish", sys.argv
    asyncio.run(publish(key, int(total), float(seconds), bool(rest and rest[0] == "async")))
