"""The app the supervisor tests run: functions with different scaling settings."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init

from celery_concurrent import concurrent

from .measure import Recorder

app = Celery("scaling", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

recorder = Recorder(app)
store = recorder.store
_measured = recorder.sleep


@app.task
@concurrent(allow_concurrent_inputs=50, concurrency_limit=4, keep_warm=1, container_idle_timeout=3)
def burst(key: str, seconds: float | None = 1.0) -> str:
    return _measured(key, seconds)


@app.task
@concurrent(max_inputs=5, min_containers=2, max_containers=3, scaledown_window=2)
def warm(key: str, seconds: float = 0.1) -> str:
    return _measured(key, seconds)


@app.task
@concurrent(max_inputs=10, max_containers=2, scaledown_window=2)
def scale_to_zero(key: str, seconds: float = 0.1) -> str:
    return _measured(key, seconds)


@app.task
@concurrent(max_inputs=4, max_containers=1, scaledown_window=30)
def other(key: str) -> str:
    return _measured(key, 0.0)


@app.task
@concurrent(max_inputs=2, max_containers=2, scaledown_window=30)
def crashy(key: str) -> str:
    return key


@worker_init.connect
def _crash_on_start(sender=None, **_):
    # Simulates a function whose container cannot start (an import error, a segfault).
    if sender is not None and sender.options.get("concurrent_function") == crashy.name:
        os._exit(3)
