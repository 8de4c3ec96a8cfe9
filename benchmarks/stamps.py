"""When each input started and ended, as its own process saw it: the refill benchmarks' record.

Plain ``redis`` only, so that the peers (Taskiq, arq), which run in a virtualenv of
their own without Celery, record the same way as ours and plain Celery's workers.

Each process keeps its inputs' ``(start, end)`` (``time.time()``) in memory and adds
them to ``<key>:stamps`` every :data:`FLUSH_EVERY` inputs and when its count reaches
the run's, so that the measurement costs no Redis round trip per input in the slot it
measures. A run is served by one process per side, so a process's count is the run's.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import redis

FLUSH_EVERY = 50

_lock = threading.Lock()
_pending: dict[str, list[tuple[float, float]]] = {}
_counts: dict[str, int] = {}


def stamp(client: redis.Redis, key: str, total: int, started: float) -> None:
    """Record one input of ``key``'s run that started at ``started`` and ends now."""
    ended = time.time()
    with _lock:
        mine = _pending.setdefault(key, [])
        mine.append((started, ended))
        count = _counts[key] = _counts.get(key, 0) + 1
        if len(mine) < FLUSH_EVERY and count < total:
            return
        batch, _pending[key] = mine, []
    client.rpush(f"{key}:stamps", *(json.dumps(pair) for pair in batch))


def reset(client: redis.Redis, key: str) -> None:
    client.delete(f"{key}:stamps")


def done(client: redis.Redis, key: str) -> int:
    """How many inputs of the run have been recorded (every 50, and the last)."""
    return int(client.llen(f"{key}:stamps"))


def read(client: redis.Redis, key: str) -> list[tuple[float, float]]:
    return [tuple(json.loads(raw)) for raw in client.lrange(f"{key}:stamps", 0, -1)]


def figures(pairs: list[tuple[float, float]], slots: int, backlog_from: float) -> dict[str, Any]:
    """Throughput and refill gaps of one run on ``slots`` slots.

    The gap of a slot is from an input ending to the next input starting in its place:
    with every slot busy, the k-th end frees the slot that the (k + slots)-th start
    takes. Only ends after ``backlog_from`` count, when the queue was sure to hold the
    next input (the publisher was ahead).
    """
    starts = sorted(start for start, _ in pairs)
    ends = sorted(end for _, end in pairs)
    gaps = [
        starts[k + slots] - end
        for k, end in enumerate(ends[: len(ends) - slots])
        if end >= backlog_from and starts[k + slots] >= end
    ]
    wall = ends[-1] - starts[0]
    return {
        "inputs": len(pairs),
        "wall_s": wall,
        "inputs_per_s": len(pairs) / wall,
        "gap_ms_p50": 1000 * statistics.median(gaps) if gaps else None,
        "gap_ms_p90": 1000 * sorted(gaps)[int(0.9 * len(gaps))] if gaps else None,
        "gaps": len(gaps),
    }


def wait_done(client: redis.Redis, key: str, total: int, timeout: float, check: Any = None) -> None:
    """Until ``total`` inputs of ``key`` are recorded; ``check()`` raises if a worker died."""
    deadline = time.monotonic() + timeout
    while done(client, key) < total:
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {done(client, key)} of {total} within {timeout:g}s")
        time.sleep(0.02)
