"""The project's Celery app, as ``celery -A proj worker`` finds it."""

from __future__ import annotations

import os

from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery(
    "proj",
    broker=BROKER,
    backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER),
    include=["proj.tasks"],
)
app.conf.broker_connection_retry_on_startup = True
