"""The app the container tests run: sync, async and plain tasks that measure themselves.

Each task counts its own concurrency in the test Redis (``peak:<key>``), so the tests
read what really ran at once, not what the configuration says.
"""

from __future__ import annotations

import asyncio
import os
import time

from celery import Celery
from celery.signals import task_failure, task_postrun, task_prerun, task_success

from celery_concurrent import concurrent

from .measure import Recorder

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

app = Celery("basic", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
    task_track_started=False,
)

recorder = Recorder(app)
store = recorder.store


@app.task
@concurrent(allow_concurrent_inputs=50)
def sleepy(key: str, seconds: float | None = 1.0) -> str:
    return recorder.sleep(key, seconds)


@app.task(acks_late=True)
@concurrent(allow_concurrent_inputs=50)
def late_sleepy(key: str, seconds: float | None = 1.0) -> str:
    return recorder.sleep(key, seconds)


@app.task
@concurrent(allow_concurrent_inputs=2000)
async def async_sleepy(key: str, seconds: float | None = 1.0) -> str:
    return await recorder.asleep(key, seconds)


@concurrent(max_inputs=10)
@app.task(bind=True, max_retries=3, default_retry_delay=0.05)
async def async_behaviour(self, mode: str, arg: float = 0.0):
    """One async task that exercises each Celery behaviour, by ``mode``."""
    await asyncio.sleep(0.01)
    if mode == "request":
        await asyncio.sleep(arg)
        return {
            "id": self.request.id,
            "args": list(self.request.args),
            "hostname": self.request.hostname,
        }
    if mode == "fail":
        raise KeyError("async boom")
    if mode == "retry":
        if self.request.retries < 2:
            raise self.retry(countdown=0.05)
        return self.request.retries
    if mode == "sleep":
        try:
            await asyncio.sleep(arg)
        except BaseException as exc:
            store().set(f"sleep-exit:{self.request.id}", type(exc).__name__)
            raise
        return "slept"
    return mode


@app.task(time_limit=1)
@concurrent(max_inputs=4)
async def async_hard_limited(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


@app.task(soft_time_limit=0.5)
@concurrent(max_inputs=4)
async def async_soft_limited(seconds: float) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    try:
        await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "finished"


@app.task
@concurrent(allow_concurrent_inputs=10, pool="gevent")
def green_sleepy(key: str, seconds: float | None = 0.5) -> str:
    return recorder.sleep(key, seconds)


@app.task
def plain_add(x: int, y: int) -> int:
    return x + y


def _record(signal_name: str):
    def handler(sender=None, task_id=None, **_):
        if sender is not None and getattr(sender, "name", "").endswith("async_behaviour"):
            # task_success carries no task_id: the request still has it.
            store().rpush(f"signals:{task_id or sender.request.id}", signal_name)

    return handler


for _signal, _name in (
    (task_prerun, "task_prerun"),
    (task_postrun, "task_postrun"),
    (task_success, "task_success"),
    (task_failure, "task_failure"),
):
    _signal.connect(_record(_name), weak=False)


@app.task
@concurrent(max_inputs=1)
def one_slot(key: str, linger: float) -> str:
    """Stamps its start; its outcome takes ``linger`` seconds to be stored (below)."""
    store().rpush(f"started:{key}", repr(time.time()))
    return recorder.sleep(key, 0.05)


@task_success.connect
def _slow_outcome(sender=None, result=None, **_):
    # The tracer's work after the function returned (here, after its result is stored):
    # a slow result backend, signal handlers, the ack.
    if sender is not None and sender.name.endswith(".one_slot"):
        linger = sender.request.args[1]
        time.sleep(linger)
        store().rpush(f"stored:{sender.request.args[0]}", repr(time.time()))
