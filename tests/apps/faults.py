"""The app the reliability tests run, on Redis or on RabbitMQ.

``CC_FAULTS_BROKER`` picks the broker (default: the test session's Redis); the counts
live in the result backend's Redis, which no test restarts. On RabbitMQ the queues carry
a per-test suffix (``CC_QUEUE_SUFFIX``), since RabbitMQ state outlives a test.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from typing import Any

from celery import Celery, Task, bootsteps
from celery.signals import worker_init

from celery_concurrent import concurrent

from .measure import Recorder

SESSION_REDIS = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
BROKER = os.environ.get("CC_FAULTS_BROKER") or SESSION_REDIS
SUFFIX = os.environ.get("CC_QUEUE_SUFFIX", "")

app = Celery("faults", broker=BROKER, backend=os.environ.get("CC_RESULT_BACKEND") or SESSION_REDIS)
# Tasks are not shared (``shared=False``): the tests reload this module per broker, and
# each reload's app must have its own tasks, with its own queues.
app.conf.update(
    # CELERY_BROKER_URL (the test session's Redis) would win over broker_url.
    broker_read_url=BROKER,
    broker_write_url=BROKER,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)

recorder = Recorder(app, setting="result_backend")


def queue(name: str) -> str | None:
    """The function's queue: a per-test one on RabbitMQ, the default one on Redis."""
    return f"cc-faults-{SUFFIX}.{name}" if SUFFIX else None


def _finish(task: Task, key: str) -> str:
    # Counted by task id: an input that runs twice (redelivered) is one completion.
    recorder.store().sadd(f"completed:{key}", task.request.id)
    return key


@app.task(bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)
@concurrent(max_inputs=5, max_containers=2, scaledown_window=30, queue=queue("sturdy"))
def sturdy(self: Task, key: str, seconds: float | None = 1.0) -> str:
    """An input that survives the loss of its container: acknowledged when it finishes."""
    recorder.sleep(key, seconds)
    return _finish(self, key)


@app.task(bind=True, shared=False)
@concurrent(max_inputs=4, max_containers=1, scaledown_window=30, queue=queue("echo"))
def echo(self: Task, key: str, value: Any) -> Any:
    """Takes exactly two arguments, so a message with another count fails."""
    _finish(self, key)
    return value


@app.task(shared=False)
@concurrent(max_inputs=2, max_containers=2, scaledown_window=30, queue=queue("broken_import"))
def broken_import(key: str) -> str:
    return key


@app.task(shared=False)
@concurrent(max_inputs=2, max_containers=2, scaledown_window=30, queue=queue("segfaults"))
def segfaults(key: str) -> str:
    return key


@app.task(bind=True, shared=False, ignore_result=True)
@concurrent(max_inputs=20, max_containers=3, scaledown_window=1, queue=queue("soak"))
def soak(self: Task, key: str) -> None:
    recorder.store().incr(f"done:{key}")


class NeedsDriver(bootsteps.Step):
    """A container of ``broken_import`` needs a module this machine does not have."""

    def __init__(self, worker: Any, concurrent_function: str | None = None, **kwargs: Any):
        if concurrent_function == broken_import.name:
            importlib.import_module("tests.apps.no_such_driver")
        super().__init__(worker, **kwargs)


app.steps["worker"].add(NeedsDriver)


@worker_init.connect
def _segfault_on_start(sender: Any = None, **_: Any) -> None:
    if sender is not None and sender.options.get("concurrent_function") == segfaults.name:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
