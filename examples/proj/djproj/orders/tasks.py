"""An app's ``tasks.py``: ``@shared_task`` and ``@concurrent`` as in any Django project."""

from __future__ import annotations

import time

from celery import shared_task

from celery_concurrent import concurrent


@shared_task
@concurrent(allow_concurrent_inputs=10, concurrency_limit=2)
def quote(order_id: int) -> float:
    time.sleep(0.05)  # a call to a carrier's API
    return round(4.99 + order_id % 7, 2)
