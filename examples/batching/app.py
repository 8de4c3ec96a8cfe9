"""One async ``generate`` at three levels of ``allow_concurrent_inputs``, and batched.

Each ``generate_N`` container runs one
:class:`~examples.batching.batcher.ContinuousBatcher`; every input the container runs at
once joins its batch. ``generate_batched`` is ``@batched`` instead: one call receives
the prompts that arrived together, as lists, and steps them as one batch. Run a node
with ``celery -A examples.batching.app worker``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_concurrent import batched, concurrent

from .batcher import MAX_BATCH, batcher, static_batch

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("batching", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.broker_connection_retry_on_startup = True


async def _generate(prompt: str, max_tokens: int) -> dict[str, Any]:
    completion = await batcher().generate(prompt, max_tokens)
    return {
        "text": completion.text,
        "tokens": completion.tokens,
        "mean_batch": completion.mean_batch,
    }


@app.task
@concurrent(allow_concurrent_inputs=1, concurrency_limit=1, keep_warm=1)
async def generate_1(prompt: str, max_tokens: int = 16) -> dict[str, Any]:
    """One input at a time: every model step carries a single sequence."""
    return await _generate(prompt, max_tokens)


@app.task
@concurrent(allow_concurrent_inputs=8, concurrency_limit=1, keep_warm=1)
async def generate_8(prompt: str, max_tokens: int = 16) -> dict[str, Any]:
    """Up to 8 inputs share each model step."""
    return await _generate(prompt, max_tokens)


@app.task
@concurrent(allow_concurrent_inputs=32, concurrency_limit=1, keep_warm=1)
async def generate_32(prompt: str, max_tokens: int = 16) -> dict[str, Any]:
    """Up to 32 inputs (the model's batch) share each model step."""
    return await _generate(prompt, max_tokens)


@app.task
@concurrent(max_inputs=1, max_containers=1, min_containers=1)
@batched(max_batch_size=MAX_BATCH, wait_ms=50)
async def generate_batched(prompts: list[str], max_tokens: list[int]) -> list[dict[str, Any]]:
    """Up to 32 prompts that arrived within 50 ms of each other, in one call: each
    caller still sends one prompt and gets its own completion."""
    completions = await static_batch(prompts, max_tokens)
    return [{"text": c.text, "tokens": c.tokens, "mean_batch": c.mean_batch} for c in completions]
