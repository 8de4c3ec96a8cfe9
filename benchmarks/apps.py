"""The app the benchmarks run: the same no-op work as a ``@concurrent`` task and a plain task.

The broker is read from ``CELERY_BROKER_URL`` when the module is imported, so a benchmark
points its worker processes at a private Redis through the environment. Results are
ignored on both sides, so neither pays for a result backend.

The only work a task does is the measurement itself: one ``INCR`` of a counter in the
broker's Redis, plus a timestamp for the first and the last input of a run (see
:mod:`benchmarks.bench_overhead`). The ``reaction_*`` and ``idle_*`` tasks serve
:mod:`benchmarks.bench_reaction`: each input stamps when it started and on which
process, with the life stamps of that process (forked, worker created, consumer ready);
``reaction_flood`` is the other function's flood beside ``reaction_flanked``.
The ``burst_*``, ``density_*`` and ``scaledown_ours`` tasks serve the scenario
benchmarks (:mod:`benchmarks.bench_burst`, :mod:`benchmarks.bench_density`,
:mod:`benchmarks.bench_scaledown`); they count themselves with :func:`record`.
The ``cluster_*`` tasks serve :mod:`benchmarks.bench_cluster` (several nodes, cluster
and node scope); they store their results, in a Redis result backend that the
benchmark turns on (:data:`RESULT_BACKEND_FLAG`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import redis
from celery import Celery, current_task, signals

from celery_concurrent import concurrent

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

#: The queue the plain worker consumes; the container's queue comes from its spec.
PLAIN_QUEUE = "bench.plain"
#: The queue of the plain task that Celery's ``--autoscale`` worker consumes.
REACTION_PLAIN_QUEUE = "bench.reaction.plain"
#: The queues of the plain workers the burst and density benchmarks compare with.
BURST_QUEUE = "bench.burst.plain"
DENSITY_QUEUE = "bench.density.plain"

app = Celery("benchmarks", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    task_routes={
        "benchmarks.apps.plain_noop": {"queue": PLAIN_QUEUE},
        "benchmarks.apps.reaction_plain": {"queue": REACTION_PLAIN_QUEUE},
        "benchmarks.apps.burst_plain": {"queue": BURST_QUEUE},
        "benchmarks.apps.density_blocking": {"queue": DENSITY_QUEUE},
        "benchmarks.apps.density_noop": {"queue": DENSITY_QUEUE},
    },
)

#: Set (to anything) in the environment of the publisher and the workers: results go to
#: a Redis result backend, the broker's Redis, as in an app that reads its results. Only
#: ``bench_cluster`` sets it; the other benchmarks run without a backend.
RESULT_BACKEND_FLAG = "BENCH_RESULT_BACKEND"
if os.environ.get(RESULT_BACKEND_FLAG):
    app.conf.result_backend = BROKER

_client: redis.Redis | None = None


def store() -> redis.Redis:
    """A client of the broker's Redis, shared by the worker's threads (redis-py is thread-safe)."""
    global _client
    if _client is None:
        # redis-py 8 caps a pool at 100 connections; a plain worker runs 400 threads.
        _client = redis.Redis.from_url(app.conf.broker_url, max_connections=1024)
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
def reaction_flanked(key: str, seconds: float = 0.0) -> None:
    """``reaction_ours`` again, on a node where :func:`reaction_flood` floods meanwhile."""
    stamp_start(key)
    time.sleep(seconds)


#: how long each input of the flood beside ``reaction_flanked`` runs
FLOOD_SECONDS = 0.2


@app.task(ignore_result=True)
@concurrent(max_inputs=50, max_containers=2, min_containers=0, scaledown_window=0.5)
def reaction_flood() -> None:
    time.sleep(FLOOD_SECONDS)


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


# -- burst, density and scale-down (bench_burst, bench_density, bench_scaledown) ------

#: Per-run tallies kept in the worker process: key -> [done, first start, last finish].
#: The density run's inputs write theirs to Redis every ``every`` inputs and at the
#: last one, so that 10,000 inputs do not pay 10,000 Redis round trips on the event loop
#: they are measuring.
_TALLIES: dict[str, list[float]] = {}
_TALLY_LOCK = threading.Lock()

# Merge one process's tally into the run's: add the count, keep the earliest start and
# the latest finish (several containers, or threads, report on one run).
_MERGE = """
local done = redis.call('INCRBY', KEYS[1], ARGV[1])
local first = redis.call('GET', KEYS[2])
if not first or tonumber(first) > tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) end
local last = redis.call('GET', KEYS[3])
if not last or tonumber(last) < tonumber(ARGV[3]) then redis.call('SET', KEYS[3], ARGV[3]) end
return done
"""


def record(key: str, total: int, started: float, every: int = 1) -> None:
    """Count one finished input of a run that started at ``started`` (``time.time()``).

    Redis then holds ``<key>:done``, ``<key>:first_start`` (the earliest start) and
    ``<key>:last_finish`` (the latest finish). With ``every > 1`` this process adds its
    share every ``every`` inputs and when its count reaches ``total`` (use it only where
    one process runs the whole run).
    """
    finished = time.time()
    with _TALLY_LOCK:
        mine = _TALLIES.setdefault(key, [0, started, finished])
        mine[0] += 1
        mine[1] = min(mine[1], started)
        mine[2] = max(mine[2], finished)
        if mine[0] % every and mine[0] != total:
            return
        done, first, last = _TALLIES.pop(key)
    keys = (f"{key}:done", f"{key}:first_start", f"{key}:last_finish")
    store().eval(_MERGE, 3, *keys, int(done), repr(first), repr(last))


#: Scenario 1: the I/O-bound burst (``bench_burst``), N=100 and at most 4 containers.
BURST_MAX_INPUTS = 100
BURST_MAX_CONTAINERS = 4


@app.task(ignore_result=True)
@concurrent(max_inputs=BURST_MAX_INPUTS, max_containers=BURST_MAX_CONTAINERS, scaledown_window=1)
def burst_ours(key: str, total: int, seconds: float) -> None:
    started = time.time()
    time.sleep(seconds)
    record(key, total, started)


@app.task(ignore_result=True)
def burst_plain(key: str, total: int, seconds: float) -> None:
    started = time.time()
    time.sleep(seconds)
    record(key, total, started)


#: Scenario 4: async density (``bench_density``), N=10,000 in one container.
DENSITY_MAX_INPUTS = 10_000
#: how often a density input adds its process's tally to Redis
DENSITY_EVERY = 500


@app.task(ignore_result=True)
@concurrent(max_inputs=DENSITY_MAX_INPUTS, max_containers=1, min_containers=1)
async def density_ours(key: str, total: int, seconds: float) -> None:
    started = time.time()
    await asyncio.sleep(seconds)
    record(key, total, started, DENSITY_EVERY)


@app.task(ignore_result=True)
def density_blocking(key: str, total: int, seconds: float) -> None:
    """The way Celery runs a coroutine today: a pool thread blocks on an event loop."""
    started = time.time()
    asyncio.run(asyncio.sleep(seconds))
    record(key, total, started, DENSITY_EVERY)


@app.task(ignore_result=True)
def density_noop(key: str, total: int, seconds: float) -> None:
    """No work at all: how fast a plain worker takes inputs in, the floor of any worker."""
    record(key, total, time.time(), DENSITY_EVERY)


#: Scenario 5: scale-down precision and the scaling plot (``bench_scaledown``).
SCALEDOWN_WINDOW = 2.0


@app.task(ignore_result=True)
@concurrent(max_inputs=10, max_containers=4, min_containers=1, scaledown_window=SCALEDOWN_WINDOW)
def scaledown_ours(key: str, seconds: float) -> None:
    """Sleep, then note which process finished the input, and when."""
    time.sleep(seconds)
    store().rpush(key, json.dumps([os.getpid(), time.time()]))


# -- cluster mode (bench_cluster) ------------------------------------------------------

#: ``bench_cluster``: N=20 and at most 3 containers, over the cluster (cluster scope) or
#: on each node (node scope)
CLUSTER_MAX_INPUTS = 20
CLUSTER_MAX_CONTAINERS = 3


def sleep_recorded(key: str, total: int, seconds: float) -> None:
    """Sleep ``seconds``, then count the input in the run's tally (:func:`record`)."""
    started = time.time()
    time.sleep(seconds)
    record(key, total, started)


@app.task(ignore_result=False)
@concurrent(
    max_inputs=CLUSTER_MAX_INPUTS, max_containers=CLUSTER_MAX_CONTAINERS, scaledown_window=1
)
def cluster_burst(key: str, total: int, seconds: float) -> None:
    """The burst on three nodes (in cluster scope, then in node scope)."""
    sleep_recorded(key, total, seconds)


@app.task(ignore_result=False)
@concurrent(
    max_inputs=CLUSTER_MAX_INPUTS, max_containers=CLUSTER_MAX_CONTAINERS, scaledown_window=1
)
def cluster_burst_alone(key: str, total: int, seconds: float) -> None:
    """:func:`cluster_burst` again, for the one node that runs beside the three."""
    sleep_recorded(key, total, seconds)


@app.task(ignore_result=False)
@concurrent(max_inputs=CLUSTER_MAX_INPUTS, max_containers=CLUSTER_MAX_CONTAINERS, min_containers=1)
def cluster_idle() -> None:
    """Never called: its ``keep_warm`` container idles while the nodes' cost is measured."""


# -- CPU per input at 100 threads (bench_threads) --------------------------------------

#: ``bench_threads``: one container of 100 threads, against ``-P threads -c 100``
THREADS_MAX_INPUTS = 100
#: the queue of the plain worker ``bench_threads`` compares with
THREADS_QUEUE = "bench.threads.plain"


@app.task(ignore_result=False)
@concurrent(max_inputs=THREADS_MAX_INPUTS, max_containers=1)
def threads_ours(key: str, total: int, seconds: float) -> None:
    """Sleep, count the input (:func:`sleep_recorded`); its result is stored."""
    sleep_recorded(key, total, seconds)


@app.task(ignore_result=False, queue=THREADS_QUEUE)
def threads_plain(key: str, total: int, seconds: float) -> None:
    """:func:`threads_ours` as a plain task."""
    sleep_recorded(key, total, seconds)
