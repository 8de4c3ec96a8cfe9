"""A small shop's Celery tasks: an order confirmation, and a slow call to a carrier's API.

Run its worker the usual way: ``celery -A <this module> worker``.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from celery_concurrent import concurrent

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("shop", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.broker_connection_retry_on_startup = True


@app.task
def send_receipt(order_id: int) -> str:
    return f"receipt for order {order_id} sent"


@app.task(bind=True, max_retries=3)
@concurrent(allow_concurrent_inputs=20, concurrency_limit=4)
def quote_shipping(self, order_id: int) -> float:
    """Ask the carrier for a price: 0.2 s of waiting on the network for each order."""
    try:
        time.sleep(0.2)
    except OSError as exc:
        raise self.retry(exc=exc, countdown=1) from exc
    return round(4.99 + order_id % 7, 2)
