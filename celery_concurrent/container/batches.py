"""A batched function's container: items gathered into batches on the event loop.

Each item is a Celery task of its own, run by the asyncio pool like any input: its
tracer stores its result, sends its signals and calls its links. The item's body hands
its arguments to the container's :class:`Batcher` and waits, costing no thread, while
the batcher calls the function once for many items. A batch takes one of the function's
``max_inputs`` slots; the container holds at most ``max_inputs x max_batch_size`` items
(its Celery concurrency), so nothing is taken from the queue that no batch can hold.

A batch goes when it is full, when its first item has waited ``wait_ms``, or, while a
slot is free, as soon as the function's queue is empty: the batcher then asks the
broker every :data:`~celery_concurrent.constants.BATCH_PROBE_INTERVAL` (on a thread of
its own), so a lone input never waits for company that is not coming.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery import Celery, current_task, signals
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from ..batching import Batched, batched_of, serve
from ..brokers import is_redis, redis_queue_lengths
from ..constants import BATCH_PROBE_INTERVAL, BATCH_SIZE_BUCKETS
from ..errors import ConfigurationError
from ..spec import FunctionSpec

logger = get_logger(__name__)


class BatchStats:
    """How many batches of each size this container ran (the histogram's buckets)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = [0] * len(BATCH_SIZE_BUCKETS)
        self.items = 0

    def observe(self, size: int) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(BATCH_SIZE_BUCKETS, size)] += 1
            self.items += size

    def snapshot(self) -> tuple[tuple[int, ...], int]:
        """``(batches per bucket, items)`` since the container started."""
        with self._lock:
            return tuple(self.counts), self.items

    def report_fields(self) -> dict[str, Any]:
        """The batch fields of a load report (none before the first batch)."""
        counts, items = self.snapshot()
        return {"batch_sizes": counts if items else (), "batched_items": items}


#: this container's batches (a container serves one function)
STATS = BatchStats()


class QueueProbe:
    """Whether the function's queue is empty, over a broker connection of its own."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue
        self._conn: Any = None
        self._channel: Any = None
        self._failing = False

    def is_empty(self) -> bool:
        """Blocking; called on the probe's thread only. Unreachable: not empty (the
        batch then waits for ``wait_ms``)."""
        try:
            if self._channel is None:
                self._conn = self.app.connection_for_read()
                self._conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
                self._channel = self._conn.channel()
            if is_redis(self.app):
                empty = redis_queue_lengths(self._channel, [self.queue])[self.queue] == 0
            else:
                empty = self._channel.queue_declare(queue=self.queue, passive=True)[1] == 0
        except Exception as exc:  # noqa: BLE001 - any failure: wait for wait_ms instead
            if not self._failing:
                logger.warning("celery-concurrent: cannot read the queue %s: %s", self.queue, exc)
            self._failing = True
            self.close()
            return False
        self._failing = False
        return bool(empty)

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()


@dataclass
class _Item:
    values: tuple[Any, ...]
    future: asyncio.Future[Any]
    #: the loop's clock when it arrived
    at: float


@dataclass(frozen=True)
class _Outcome:
    result: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is None:
            return self.result
        # Each item raises a copy, so that each stores its own traceback: the function's
        # frames, then its own.
        try:
            clone = copy.copy(self.error)
        except Exception:  # noqa: BLE001 - an exception that cannot be copied
            clone = self.error
        clone.__cause__ = self.error.__cause__
        raise clone.with_traceback(self.error.__traceback__)


class Batcher:
    """Gathers one batched function's items into batches, on the container's event loop.

    Parameters
    ----------
    batched:
        The function, its parameters and its settings.
    max_inputs:
        The most batches that run at once.
    probe:
        Says whether the function's queue is empty.
    stats:
        Where each batch's size is counted.
    """

    def __init__(
        self, batched: Batched, max_inputs: int, probe: QueueProbe, stats: BatchStats = STATS
    ) -> None:
        self.batched = batched
        self.max_batch_size = batched.settings.max_batch_size
        self.wait = batched.settings.wait_ms / 1000
        self.max_inputs = max_inputs
        self.probe = probe
        self.stats = stats
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: deque[_Item] = deque()
        self.running = 0
        self.draining = False
        self._probing = False
        #: ids of the items that reached the batcher, while the container holds them
        self._seen: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._probes = ThreadPoolExecutor(1, thread_name_prefix="celery-concurrent-batch-probe")
        self._threads = (
            None
            if batched.is_async
            else ThreadPoolExecutor(max_inputs, thread_name_prefix="celery-concurrent-batch")
        )

    async def submit(self, values: tuple[Any, ...]) -> Any:
        """Run one item in a batch; return its result or raise the batch's error."""
        loop = self.loop = asyncio.get_running_loop()
        request_id = getattr(current_task.request, "id", None) if current_task else None
        if request_id is not None:
            self._seen.add(request_id)
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append(_Item(values, future, loop.time()))
        self._consider()
        outcome = await future
        return outcome.unwrap()

    def on_shutdown(self, **_: Any) -> None:
        """The worker is stopping: what waits goes at once (from any thread)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.draining = True
        self._consider()

    def _consider(self, queue_empty: bool = False) -> None:
        """Start every batch that may go now; otherwise wait for its deadline or an
        empty queue."""
        while self.running < self.max_inputs:
            while self.pending and self.pending[0].future.done():
                self.pending.popleft()  # a time limit or a revoke ended it meanwhile
            if not self.pending:
                return
            deadline = self.pending[0].at + self.wait
            assert self.loop is not None
            full = len(self.pending) >= self.max_batch_size
            if full or queue_empty or self.draining or self.loop.time() >= deadline:
                self._flush()
                continue
            self._arm_timer(deadline)
            self._start_probe()
            return

    def _arm_timer(self, deadline: float) -> None:
        assert self.loop is not None
        if self._timer is not None:
            if self._timer.when() <= deadline and not self._timer.cancelled():
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._consider()

    def _start_probe(self) -> None:
        if self._probing:
            return
        self._probing = True
        assert self.loop is not None
        self.loop.create_task(self._watch_queue())

    async def _watch_queue(self) -> None:
        """While part of a batch waits and a slot is free: is the queue empty yet?"""
        loop = asyncio.get_running_loop()
        try:
            while self.pending and self.running < self.max_inputs and not self.draining:
                empty = await loop.run_in_executor(self._probes, self.probe.is_empty)
                # An input the container took but that has not reached us yet is
                # company that is coming: wait for it.
                if empty and not self._on_its_way():
                    self._consider(queue_empty=True)
                else:
                    await asyncio.sleep(BATCH_PROBE_INTERVAL)
        finally:
            self._probing = False

    def _on_its_way(self) -> bool:
        """Whether the container holds items that have not reached the batcher yet."""
        for _ in range(3):
            try:
                held = {request.id for request in worker_state.reserved_requests}
            except RuntimeError:  # the consumer's thread changed the set while we copied it
                continue
            self._seen &= held
            return bool(held - self._seen)
        return True

    def _flush(self) -> None:
        items: list[_Item] = []
        while self.pending and len(items) < self.max_batch_size:
            item = self.pending.popleft()
            if not item.future.done():
                items.append(item)
        if not items:
            return
        self.running += 1
        self.stats.observe(len(items))
        assert self.loop is not None
        self.loop.create_task(self._run(items))

    async def _run(self, items: list[_Item]) -> None:
        try:
            returned = await self._call([item.values for item in items])
            results = self.batched.results(returned, len(items))
        except BaseException as exc:  # noqa: BLE001 - every item of the batch fails with it
            outcomes = [_Outcome(error=exc)] * len(items)
        else:
            outcomes = [_Outcome(result=result) for result in results]
        finally:
            self.running -= 1
        for item, outcome in zip(items, outcomes, strict=True):
            if not item.future.done():
                item.future.set_result(outcome)
        self._consider()

    async def _call(self, values: list[tuple[Any, ...]]) -> Any:
        if self._threads is None:
            return await self.batched.call(values)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self.batched.call, values)


def serve_batches(app: Celery, spec: FunctionSpec) -> Batcher:
    """Gather the items of ``spec``'s function into batches in this container."""
    task = app.tasks[spec.name]
    run = type(task).__dict__.get("run")
    batched = batched_of(run)
    if batched is None or not isinstance(run, staticmethod):
        raise ConfigurationError(
            "max_batch_size", spec.max_batch_size, f"{spec.name} is not @batched"
        )
    batcher = Batcher(batched, spec.max_inputs, QueueProbe(app, spec.queue))
    serve(run.__func__, batcher)
    signals.worker_shutting_down.connect(batcher.on_shutdown, weak=False)
    return batcher
