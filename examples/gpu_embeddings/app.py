"""``embed``: a batch of texts in, a batch of vectors out, on a GPU of the container's own.

Run a GPU node with ``celery -A examples.gpu_embeddings.app worker -n gpu@%h`` (it finds
its GPUs with nvidia-smi), or simulate one with ``--gpus "0:A100,1:A100"``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

from celery_concurrent import concurrent

from .model import model

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery(
    "gpu_embeddings", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER)
)
app.conf.broker_connection_retry_on_startup = True


@app.task(bind=True)
@concurrent(gpu="any", allow_concurrent_inputs=8, concurrency_limit=2, container_idle_timeout=10)
def embed(self: Task, texts: list[str]) -> dict[str, Any]:
    """Up to 8 batches at once per container (threads sharing one model), one GPU each."""
    embedder = model()
    return {
        "vectors": embedder.encode(texts),
        "device": embedder.device,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "container": self.request.hostname,
    }
