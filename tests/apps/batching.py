"""The app the batching tests run: ``@batched`` functions that record each batch.

Each batch appends its size to ``sizes:<function>`` in the test Redis and counts itself
running (``running:``/``peak:`` of the function's key), so the tests read the batches
that really ran and how many ran at once.
"""

from __future__ import annotations

import json
import os

from celery import Celery

from celery_concurrent import batched, concurrent

from .measure import UNTIL_RELEASED, Recorder

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

app = Celery("batching", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
)

recorder = Recorder(app)
store = recorder.store


def record(name: str, size: int) -> None:
    store().rpush(f"sizes:{name}", size)


def sizes(name: str) -> list[int]:
    """The size of every batch ``name`` ran, in order."""
    return [int(n) for n in store().lrange(f"sizes:{name}", 0, -1)]


def batches(name: str) -> list[list[str]]:
    """The items of every batch ``name`` ran, in order (functions that record them)."""
    return [json.loads(b) for b in store().lrange(f"batches:{name}", 0, -1)]


@app.task
@concurrent(max_inputs=2, max_containers=2, scaledown_window=5)
@batched(max_batch_size=8, wait_ms=200)
def double(xs: list[int], seconds: list[float]) -> list[int]:
    record("double", len(xs))
    recorder.sleep("double", max(seconds))
    return [x * 2 for x in xs]


@app.task
@batched(max_batch_size=16, wait_ms=100)
@concurrent(max_inputs=3)
async def add(xs: list[int], ys: list[int]) -> list[int]:
    record("add", len(xs))
    await recorder.asleep("add", 0.05)
    return [x + y for x, y in zip(xs, ys, strict=True)]


@app.task(max_batch_size=4, wait_ms=100, max_inputs=2)
def negate(xs: list[int]) -> list[int]:
    record("negate", len(xs))
    return [-x for x in xs]


@app.task
@batched(max_batch_size=4, wait_ms=1000)
def fragile(words: list[str]) -> list[str]:
    """Fails its whole batch on ``"boom"``; returns one result too few on ``"short"``."""
    record("fragile", len(words))
    store().rpush("batches:fragile", json.dumps(words))
    if "boom" in words:
        raise ValueError(f"boom in {words}")
    if "short" in words:
        return words[:-1]
    return [w.upper() for w in words]


@app.task
@batched(max_batch_size=32, wait_ms=3000)
def lone(xs: list[int]) -> list[int]:
    record("lone", len(xs))
    return xs


@app.task
@concurrent(max_inputs=2)
@batched(max_batch_size=8, wait_ms=2000)
def hold(keys: list[str]) -> list[str]:
    """Each batch runs until the test releases its first key."""
    record("hold", len(keys))
    recorder.sleep(keys[0], UNTIL_RELEASED)
    return keys
