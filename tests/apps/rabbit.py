"""The RabbitMQ test app: its queues carry a per-run suffix, since RabbitMQ state persists."""

from __future__ import annotations

import os

from celery import Celery

from celery_concurrent import concurrent

from .measure import Recorder

SUFFIX = os.environ.get("CC_QUEUE_SUFFIX", "manual")

RABBITMQ_URL = os.environ.get("CC_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery(
    "rabbit",
    broker=RABBITMQ_URL,
    backend=os.environ.get("CC_RESULT_BACKEND", "redis://127.0.0.1:6379/15"),
)
app.conf.update(
    # CELERY_BROKER_URL (the test session's Redis) would win over broker_url.
    broker_read_url=RABBITMQ_URL,
    broker_write_url=RABBITMQ_URL,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

# The broker is RabbitMQ: the counts live in the result backend's Redis.
recorder = Recorder(app, setting="result_backend")


@app.task
@concurrent(max_inputs=5, max_containers=3, scaledown_window=2, queue=f"cc-test-{SUFFIX}.slow")
def slow(key: str, seconds: float | None = 2.0) -> str:
    return recorder.sleep(key, seconds)


@app.task
@concurrent(max_inputs=200, queue=f"cc-test-{SUFFIX}.aslow")
async def aslow(key: str, seconds: float | None = 0.5) -> str:
    return await recorder.asleep(key, seconds)
