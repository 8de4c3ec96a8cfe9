"""The app the shutdown tests run: ``acks_late`` functions that count every run of every input.

Each input increments ``runs:<task id>`` and ``running:<task name>`` when it starts, and
adds its id to ``completed`` (and decrements the running count) when it finishes, so a
test sees an input that ran twice as well as one that was lost.
A short ``visibility_timeout`` (swept every second) lets the next node redeliver what a
node killed outright left unacknowledged, within a test's patience instead of kombu's hour.
"""

from __future__ import annotations

import asyncio
import os
import time

from celery import Celery, Task

from celery_concurrent import concurrent

from .measure import Recorder

#: longer than any input is held unacknowledged while it runs normally, even under load
VISIBILITY_TIMEOUT = 12

app = Celery("shutdown", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)

#: the counters' client: one per process, safe for a container's first inputs at once
store = Recorder(app).store


def _started(task: Task) -> None:
    store().pipeline().incr(f"runs:{task.request.id}").incr(f"running:{task.name}").execute()


def _finished(task: Task) -> None:
    store().pipeline().sadd("completed", task.request.id).decr(f"running:{task.name}").execute()


@app.task(bind=True, acks_late=True)
@concurrent(max_inputs=20, max_containers=2, scaledown_window=30)
def sync_input(self: Task, seconds: float) -> str:
    _started(self)
    time.sleep(seconds)
    _finished(self)
    return self.request.id


@app.task(bind=True, acks_late=True)
@concurrent(max_inputs=20, max_containers=2, scaledown_window=30)
async def async_input(self: Task, seconds: float) -> str:
    _started(self)
    await asyncio.sleep(seconds)
    _finished(self)
    return self.request.id
