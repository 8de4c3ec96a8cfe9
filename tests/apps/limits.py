"""The app the time-limit tests run: sync and async functions that time themselves.

``limited`` and ``async_limited`` take their limits from the call (``apply_async``
options) or the app's settings (``CC_LIMITS_SOFT`` in the environment sets
``task_soft_time_limit``); ``guarded`` is the issue's function, with its limit as a task
option. Every input counts its runs (``runs:<task id>``) and its ``task_failure``
signals (``failures:<task id>``) in the test Redis, and an input told to ``wait`` runs
until the test sets ``release``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_failure

from celery_concurrent import concurrent

from .measure import Recorder

app = Celery("limits", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
if os.environ.get("CC_LIMITS_SOFT"):
    app.conf.task_soft_time_limit = float(os.environ["CC_LIMITS_SOFT"])

store = Recorder(app).store

#: a held input ends by itself after this long, should a test fail before releasing it
HOLD_LIMIT_SECONDS = 60.0


def _naps(seconds: float) -> None:
    """Short sleeps: the soft limit is raised between two of them."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)


def _spin(seconds: float) -> None:
    """Pure Python: the soft limit is raised between two bytecodes."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1


def _held(key: str) -> bool:
    return not store().exists(key)


def _run_sync(mode: str, seconds: float) -> None:
    if mode == "naps":
        _naps(seconds)
    elif mode == "spin":
        _spin(seconds)
    elif mode == "sleep":
        time.sleep(seconds)  # one blocking call: a limit waits for it to return
    elif mode == "block":
        threading.Event().wait()  # never returns
    elif mode == "wait":
        end = time.monotonic() + HOLD_LIMIT_SECONDS
        while _held("release") and time.monotonic() < end:
            time.sleep(0.05)


@app.task(bind=True, acks_late=True)
@concurrent(max_inputs=10)
def limited(self: Task, mode: str, seconds: float = 0.0, catch: bool = False) -> str:
    """Run ``mode`` for ``seconds``; with ``catch``, return what a soft limit did."""
    store().incr(f"runs:{self.request.id}")
    began = time.monotonic()
    try:
        _run_sync(mode, seconds)
    except SoftTimeLimitExceeded as exc:
        return _soft_limit(self, exc, began, catch)
    return "finished"


@app.task(bind=True, acks_late=True)
@concurrent(max_inputs=10)
async def async_limited(self: Task, mode: str, seconds: float = 0.0, catch: bool = False) -> str:
    store().incr(f"runs:{self.request.id}")
    began = time.monotonic()
    try:
        if mode == "wait":
            end = time.monotonic() + HOLD_LIMIT_SECONDS
            while _held("release") and time.monotonic() < end:
                await asyncio.sleep(0.05)
        elif mode == "block":
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded as exc:
        return _soft_limit(self, exc, began, catch)
    return "finished"


def _soft_limit(task: Task, exc: SoftTimeLimitExceeded, began: float, catch: bool) -> str:
    """Handle the soft limit (``catch``: record when it came), or let it fail the input."""
    if not catch:
        raise exc
    store().set(f"caught-after:{task.request.id}", time.monotonic() - began)
    return "soft limit caught"


@app.task(soft_time_limit=1)
@concurrent(allow_concurrent_inputs=10)
def guarded(x: int, seconds: float = 2.0) -> int:
    """The issue's function: on prefork, a soft limit makes it return 0."""
    try:
        time.sleep(seconds)
        return x
    except SoftTimeLimitExceeded:
        return 0


@app.task
def collect(values: list[int]) -> list[int]:
    return sorted(values)


@task_failure.connect
def _count_failure(sender=None, task_id=None, **_):
    if task_id:
        store().incr(f"failures:{task_id}")
