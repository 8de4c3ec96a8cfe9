"""The examples app: an I/O-bound sync function and an async one, each one decorator away
from a plain Celery task.

Run a node with ``celery -A examples.app worker -l INFO`` and watch it with
``celery -A examples.app concurrent status --watch``.
"""

from __future__ import annotations

import asyncio
import os
import time

from celery import Celery

from celery_concurrent import concurrent

app = Celery("examples", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    result_backend=os.environ.get("CELERY_RESULT_BACKEND", app.conf.broker_url),
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)


@app.task
@concurrent(allow_concurrent_inputs=20, concurrency_limit=4, keep_warm=1, container_idle_timeout=5)
def fetch(url: str) -> str:
    """Stands in for a blocking HTTP call: 20 at once on threads in each container."""
    time.sleep(0.5)
    return f"fetched {url}"


@app.task
@concurrent(allow_concurrent_inputs=500, concurrency_limit=2, container_idle_timeout=5)
async def ask(prompt: str) -> str:
    """Stands in for an awaited API call: 500 at once as asyncio tasks in each container."""
    await asyncio.sleep(1.0)
    return f"answered {prompt!r}"
