"""The Celery-compatibility test app: Celery's own features over ``@concurrent`` functions.

It runs with ``task_create_missing_queues=False``, as Celery's own test configuration
and careful deployments do, so every function's queue must be declared for it. Each
task counts its runs in the test Redis (``runs:<name>:<task id>``), so a test can tell a
task that never ran from one that ran and whose state was then overwritten.
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery, shared_task

from celery_concurrent import concurrent

from .measure import Recorder

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

app = Celery("compat", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
    task_create_missing_queues=False,
    result_extended=True,
)

recorder = Recorder(app)


def count_run(name: str, task_id: str) -> None:
    recorder.store().incr(f"runs:{name}:{task_id}")


@app.task(bind=True)
@concurrent(allow_concurrent_inputs=8, container_idle_timeout=0.5)
def add(self, x: int, y: int) -> int:
    count_run("add", self.request.id)
    return x + y


@app.task(bind=True)
@concurrent(allow_concurrent_inputs=8, container_idle_timeout=0.5)
async def aio_add(self, x: int, y: int) -> int:
    count_run("aio_add", self.request.id)
    await asyncio.sleep(0.01)
    return x + y


@shared_task(bind=True)
@concurrent(allow_concurrent_inputs=8)
def total(self, numbers: list[int]) -> int:
    count_run("total", self.request.id)
    return sum(numbers)


@app.task(bind=True, max_retries=3)
@concurrent(allow_concurrent_inputs=4)
def flaky(self, key: str, failures: int) -> int:
    """Fails ``failures`` times (retrying after a countdown), then returns its retries."""
    count_run("flaky", key)
    if self.request.retries < failures:
        raise self.retry(countdown=0.2)
    return self.request.retries


@app.task
@concurrent(allow_concurrent_inputs=4)
async def boom(message: str) -> None:
    raise ValueError(message)


@app.task(bind=True)
@concurrent(allow_concurrent_inputs=4)
def remember(self, *args: object) -> None:
    """A callback: keeps what it was called with, under its own task id."""
    recorder.store().rpush("remembered", repr([self.request.id, *args]))


@app.task(bind=True, ignore_result=True)
@concurrent(allow_concurrent_inputs=4)
def fire_and_forget(self, key: str) -> str:
    count_run("fire_and_forget", key)
    return key
