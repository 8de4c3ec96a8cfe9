"""The app the benchmarks run: the same no-op work as a ``@concurrent`` task and a plain task.

The broker is read from ``CELERY_BROKER_URL`` when the module is imported, so a benchmark
points its worker processes at a private Redis through the environment. Results are
ignored on both sides, so neither pays for a result backend.

The only work a task does is the measurement itself: one ``INCR`` of a counter in the
broker's Redis, plus a timestamp for the first and the last input of a run (see
:mod:`benchmarks.bench_overhead`).
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from celery_concurrent import concurrent

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

#: The queue the plain worker consumes; the container's queue comes from its spec.
PLAIN_QUEUE = "bench.plain"

app = Celery("benchmarks", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    task_routes={"benchmarks.apps.plain_noop": {"queue": PLAIN_QUEUE}},
)

_client: redis.Redis | None = None


def store() -> redis.Redis:
    """A client of the broker's Redis, shared by the worker's threads (redis-py is thread-safe)."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(app.conf.broker_url)
    return _client


def count(key: str, total: int) -> None:
    """Count one finished input; stamp the first and the last of ``total``."""
    done = store().incr(key)
    if done == 1 or done == total:
        store().set(f"{key}:t{done}", repr(time.time()))


@app.task(ignore_result=True)
@concurrent(allow_concurrent_inputs=10)
def concurrent_noop(key: str, total: int) -> None:
    count(key, total)


@app.task(ignore_result=True)
def plain_noop(key: str, total: int) -> None:
    count(key, total)
