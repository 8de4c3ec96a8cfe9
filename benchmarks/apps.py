"""The app the benchmarks run: the same no-op work as a ``@concurrent`` task and a plain task.

The broker is read from ``CELERY_BROKER_URL`` when the module is imported, so a benchmark
points its worker processes at a private Redis through the environment. Results are
ignored on both sides, so neither pays for a result backend.

The only work a task does is the measurement itself: one ``INCR`` of a counter in the
broker's Redis, plus a timestamp for the first and the last input of a run (see
:mod:`benchmarks.bench_overhead`). The ``reaction_*`` and ``idle_*`` tasks serve
:mod:`benchmarks.bench_reaction`: each input stamps when it started and on which
process, with the life stamps of that process (forked, worker created, consumer ready).
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery, current_task, signals

from celery_concurrent import concurrent

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

#: The queue the plain worker consumes; the container's queue comes from its spec.
PLAIN_QUEUE = "bench.plain"
#: The queue of the plain task that Celery's ``--autoscale`` worker consumes.
REACTION_PLAIN_QUEUE = "bench.reaction.plain"

app = Celery("benchmarks", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    task_routes={
        "benchmarks.apps.plain_noop": {"queue": PLAIN_QUEUE},
        "benchmarks.apps.reaction_plain": {"queue": REACTION_PLAIN_QUEUE},
    },
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


# -- reaction time (benchmarks.bench_reaction) ----------------------------------------

#: ``time.monotonic()`` (system-wide on Linux) at points in this process's life
LIFE: dict[str, float] = {"imported": time.monotonic()}


def _forked() -> None:
    # Forked containers (fork server) and prefork pool processes start here.
    LIFE.clear()
    LIFE["forked"] = time.monotonic()


os.register_at_fork(after_in_child=_forked)


@signals.celeryd_init.connect
def _worker_created(**_: object) -> None:
    LIFE["worker_created"] = time.monotonic()


@signals.worker_ready.connect
def _consumer_ready(**_: object) -> None:
    LIFE["consumer_ready"] = time.monotonic()


def stamp_start(key: str) -> None:
    """Record that an input started: when, on which node and process, and that process's life."""
    started = time.monotonic()  # before anything else: a new process connects to Redis below
    request = current_task.request if current_task else None
    stamp = {"at": started, "host": getattr(request, "hostname", None), "pid": os.getpid()}
    store().rpush(key, json.dumps({**stamp, **LIFE}))


@app.task(ignore_result=True)
@concurrent(max_inputs=10, max_containers=1, min_containers=0, scaledown_window=0.5)
def reaction_ours(key: str, seconds: float = 0.0) -> None:
    stamp_start(key)
    time.sleep(seconds)


@app.task(ignore_result=True)
@concurrent(max_inputs=10, max_containers=1, min_containers=0, scaledown_window=0.5)
def reaction_exec(key: str, seconds: float = 0.0) -> None:
    stamp_start(key)
    time.sleep(seconds)


@app.task(ignore_result=True)
def reaction_plain(key: str, seconds: float = 0.0) -> None:
    stamp_start(key)
    time.sleep(seconds)


@app.task(ignore_result=True)
@concurrent(max_inputs=10, min_containers=1)
def idle_sync() -> None:
    pass


@app.task(ignore_result=True)
@concurrent(max_inputs=100, min_containers=1)
async def idle_async() -> None:
    pass
