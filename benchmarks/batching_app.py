"""The app :mod:`benchmarks.bench_batching` runs: one model step, three ways to feed it.

The model step costs :data:`STEP_SECONDS` whether it carries 1 item or 32, and one step
runs at a time per process (the one GPU of a container): a lock holds it. The three
sides run the same step:

- ``model_batched``: ``@batched(max_batch_size=32, wait_ms=20)`` under
  ``@concurrent(max_inputs=2)``: up to two batches in flight (one filling while one
  steps), so a container holds at most 64 messages;
- ``model_batches``: celery-batches' ``Batches`` task (``flush_every=32``,
  ``flush_interval=0.02``) on a plain worker (``-P threads -c 2``, prefetch 64);
- ``model_single``: plain ``@concurrent(max_inputs=32)``, one item per step.

Each side records, per item, when it was sent and when its step ended
(``bench:batching:<side>``, ``"sent completed"``), and each batch's size. Results are
ignored on every side: celery-batches stores none by itself, so nobody pays for a
backend. The broker is read from ``CELERY_BROKER_URL`` when the module is imported.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import redis
from celery import Celery

from celery_concurrent import batched, concurrent

try:  # the peer; the benchmark says how to install it
    from celery_batches import Batches
except ImportError:  # pragma: no cover - the side is skipped
    Batches = None

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
#: what one model step costs, for a batch of 1 to MAX_BATCH
STEP_SECONDS = 0.02
MAX_BATCH = 32
WAIT_MS = 20
#: the queue of celery-batches' plain worker
BATCHES_QUEUE = "bench.batches"

app = Celery("bench_batching", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    task_routes={"benchmarks.batching_app.model_batches": {"queue": BATCHES_QUEUE}},
)

_model = threading.Lock()


@functools.cache
def store() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url, max_connections=256)


def step(side: str, sent_at: list[float]) -> None:
    """One model step over the batch, then one record per item."""
    with _model:
        time.sleep(STEP_SECONDS)
    now = time.time()
    with store().pipeline(transaction=False) as pipe:
        pipe.rpush(f"bench:batching:{side}", *(f"{sent} {now}" for sent in sent_at))
        pipe.rpush(f"bench:batching:{side}:sizes", len(sent_at))
        pipe.execute()


@app.task(ignore_result=True)
@concurrent(max_inputs=2)
@batched(max_batch_size=MAX_BATCH, wait_ms=WAIT_MS)
def model_batched(sent_at: list[float]) -> list[None]:
    step("batched", sent_at)
    return [None] * len(sent_at)


@app.task(ignore_result=True)
@concurrent(max_inputs=MAX_BATCH)
def model_single(sent_at: float) -> None:
    step("single", [sent_at])


if Batches is not None:

    @app.task(base=Batches, flush_every=MAX_BATCH, flush_interval=WAIT_MS / 1000)
    def model_batches(requests: list[Any]) -> None:
        step("batches", [request.args[0] for request in requests])
