"""Tasks written with ``@shared_task``, as most projects write them.

``@concurrent`` goes below ``@shared_task``: the function is decorated before Celery makes a
task of it for each app.
"""

from __future__ import annotations

import asyncio
import time

from celery import shared_task

from celery_concurrent import concurrent


@shared_task
def ping() -> str:
    """A plain task: it keeps running in the node's own pool."""
    return "pong"


@shared_task
@concurrent(allow_concurrent_inputs=4, keep_warm=1)
def add(x: int, y: int) -> int:
    time.sleep(0.05)
    return x + y


@shared_task(bind=True)
@concurrent(allow_concurrent_inputs=20, concurrency_limit=2)
async def lookup(self, key: str) -> str:
    await asyncio.sleep(0.05)
    return f"{key}@{self.request.hostname}"
