"""The same HTTP GET three ways: a plain task, a sync ``@concurrent`` one, an async one.

Run a node with ``celery -A examples.io_bound.app worker -c 2``.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit
from urllib.request import urlopen

from celery import Celery

from celery_concurrent import concurrent

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("io_bound", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.broker_connection_retry_on_startup = True


@app.task
def get_plain(url: str) -> int:
    """As Celery runs it today: one call at a time in each worker process."""
    with urlopen(url, timeout=60) as reply:
        return len(reply.read())


@app.task
@concurrent(allow_concurrent_inputs=20, concurrency_limit=2, keep_warm=1, container_idle_timeout=30)
def get_sync(url: str) -> int:
    """The same code, 20 calls at once on threads in each container, up to 2 containers."""
    with urlopen(url, timeout=60) as reply:
        return len(reply.read())


@app.task
@concurrent(
    allow_concurrent_inputs=200, concurrency_limit=1, keep_warm=1, container_idle_timeout=30
)
async def get_async(url: str) -> int:
    """200 calls at once as asyncio tasks on one event-loop thread, in one container."""
    return len(await http_get(url))


async def http_get(url: str) -> bytes:
    """A minimal HTTP/1.0 GET on asyncio streams (an async client library does the same)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        writer.write(f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        await writer.drain()
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")  # the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    status = head.split(b" ", 2)[1] if head.count(b" ") else b"?"
    if status != b"200":
        raise OSError(f"GET {url}: HTTP {status.decode(errors='replace')}")
    return body
