"""The app the Kubernetes tests generate manifests for and run containers of.

``gated`` holds each input until the test lets it go (``release``): while they are held
the demand is exactly the inputs sent, so the endpoint's numbers can be checked to the
input. The other functions give the manifests their GPU and bound cases.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from celery_concurrent import concurrent

app = Celery("kube", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=os.environ.get("CELERY_RESULT_BACKEND") or app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)

if os.environ.get("CC_SCOPE"):
    app.conf.concurrent_scope = os.environ["CC_SCOPE"]

GATE = "kube:gate"


def store() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


def release(count: int) -> None:
    """Let ``count`` held inputs of ``gated`` finish."""
    if count:
        store().rpush(GATE, *["go"] * count)


@app.task(acks_late=True)
@concurrent(max_inputs=4, target_inputs=2, max_containers=6, min_containers=1, scaledown_window=30)
def gated(n: int) -> int:
    store().blpop([GATE], timeout=60)
    return n


@app.task
@concurrent(max_inputs=8, max_containers=2, gpu="A100:2")
def embed(texts: list[str]) -> int:
    return len(texts)


@app.task
@concurrent(max_inputs=2, gpu=["H100", "A100"], min_containers=0, max_containers=4)
def generate(prompt: str) -> str:
    return prompt


@app.task
@concurrent(max_inputs=10, gpu="any", max_containers=3, scaledown_window=12.5)
def anygpu(x: int) -> int:
    return x


@app.task
@concurrent(max_inputs=20)
async def unbounded(x: int) -> int:
    return x
