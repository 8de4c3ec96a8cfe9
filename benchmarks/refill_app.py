"""The app :mod:`benchmarks.bench_refill` and :mod:`benchmarks.bench_intake` run.

The same work on both Celery sides: ``refill_ours`` is a ``@concurrent(max_inputs=10)``
function with one warm container; ``refill_plain`` runs on a plain ``-P threads -c 10``
worker. ``intake_ours`` is an ``async def`` function with ``max_inputs=10000`` in one
container, ``intake_plain`` its plain Celery counterpart. Results are stored in a Redis
result backend (the broker's Redis), as in an app that reads its results. Each input
records its start and end (:mod:`benchmarks.stamps`). The broker is read from
``CELERY_BROKER_URL`` when the module is imported.
"""

from __future__ import annotations

import asyncio
import os
import time

import redis
from celery import Celery

from benchmarks import stamps
from celery_concurrent import concurrent

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
SLOTS = 10
PLAIN_QUEUE = "bench.refill.plain"
INTAKE_PLAIN_QUEUE = "bench.intake.plain"

app = Celery("refill", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    task_routes={
        "benchmarks.refill_app.refill_plain": {"queue": PLAIN_QUEUE},
        "benchmarks.refill_app.intake_plain": {"queue": INTAKE_PLAIN_QUEUE},
    },
)

_client: redis.Redis | None = None


def store() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(app.conf.broker_url, max_connections=64)
    return _client


def work(key: str, total: int, seconds: float) -> int:
    started = time.time()
    time.sleep(seconds)
    stamps.stamp(store(), key, total, started)
    return total


@app.task
@concurrent(max_inputs=SLOTS, max_containers=1, min_containers=1)
def refill_ours(key: str, total: int, seconds: float) -> int:
    return work(key, total, seconds)


@app.task
def refill_plain(key: str, total: int, seconds: float) -> int:
    return work(key, total, seconds)


# -- intake (benchmarks.bench_intake) ---------------------------------------------------

#: one container takes in up to this many async inputs at once
INTAKE_SLOTS = 10_000


async def arrive(key: str, total: int, seconds: float) -> int:
    started = time.time()
    if seconds:
        await asyncio.sleep(seconds)
    stamps.stamp(store(), key, total, started)
    return total


@app.task
@concurrent(max_inputs=INTAKE_SLOTS, max_containers=1, min_containers=1)
async def intake_ours(key: str, total: int, seconds: float) -> int:
    return await arrive(key, total, seconds)


@app.task
def intake_plain(key: str, total: int, seconds: float) -> int:
    started = time.time()
    time.sleep(seconds)
    stamps.stamp(store(), key, total, started)
    return total
