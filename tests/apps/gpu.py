"""The app the GPU tests run: functions that ask for GPUs, on nodes that simulate them.

Each input reports the devices its container was given and the container's node name.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

from celery_concurrent import concurrent

from .measure import Recorder

app = Celery("gpu", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

recorder = Recorder(app)


def _seen(task: Task, key: str, seconds: float | None) -> dict[str, Any]:
    recorder.sleep(key, seconds)
    return {"devices": os.environ["CUDA_VISIBLE_DEVICES"], "container": task.request.hostname}


@app.task(bind=True)
@concurrent(gpu="A100", allow_concurrent_inputs=2, concurrency_limit=4, container_idle_timeout=5)
def embed(self: Task, key: str, seconds: float | None = 0.3) -> dict[str, Any]:
    return _seen(self, key, seconds)


@app.task(bind=True)
@concurrent(gpu="a100:2", keep_warm=1, container_idle_timeout=30)
def shard(self: Task, key: str, seconds: float = 0.0) -> dict[str, Any]:
    return _seen(self, key, seconds)


@app.task(bind=True)
@concurrent(gpu="H100", allow_concurrent_inputs=4)
def train(self: Task, key: str) -> dict[str, Any]:
    return _seen(self, key, 0.0)
