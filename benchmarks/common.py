"""What the scenario benchmarks measure with: publishing inputs, reading a run's tally,
waiting on a condition while a worker lives, sampling a process's threads and memory,
the moment something first holds, a node's metrics, and the spread of a figure.

How a benchmark runs (its Redis, its workers, its report) is :mod:`benchmarks.scenario`.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.request import urlopen

import redis

from celery_concurrent.supervisor.supervisor import DEFAULT_POLL_INTERVAL
from devkit.processes import rss_bytes, thread_count
from devkit.waiting import wait_for

#: how often a burst waits for its run to finish, and a sampler looks at a process
POLL_SECONDS = 0.01
#: a random pause before each burst, longer than the supervisor's poll interval: a side
#: turns cold in step with its own clock, and a real burst lands anywhere in the poll
JITTER_SECONDS = 4 * DEFAULT_POLL_INTERVAL


def spread(values: list[float]) -> dict[str, float]:
    """A figure over the runs: its median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, proc: Any = None
) -> None:
    """Poll ``predicate`` every :data:`POLL_SECONDS` until it holds; ``TimeoutError``
    after ``timeout`` seconds, ``RuntimeError`` at once if the worker ``proc`` exits."""

    def holds() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the worker exited ({proc.returncode})")
        return bool(predicate())

    wait_for(holds, timeout, POLL_SECONDS, what, error=TimeoutError)


def publish(
    app: Any,
    task_name: str,
    args: tuple[Any, ...],
    total: int,
    queue: str | None = None,
    **options: Any,
) -> float:
    """Publish ``total`` inputs of a task (to ``queue``, else where the app routes it),
    with ``apply_async``'s ``options``, on one producer; return how long it took."""
    task = app.tasks[task_name]
    if queue is not None:
        options.update(queue=queue, routing_key=queue)
    began = time.monotonic()
    with app.producer_or_acquire() as producer:
        for _ in range(total):
            task.apply_async(args, producer=producer, **options)
    return time.monotonic() - began


@dataclass(frozen=True)
class Tally:
    """What the inputs of one run wrote (:func:`benchmarks.apps.record`)."""

    done: int
    first_start: float
    last_finish: float


def reset_tally(rds: redis.Redis, key: str) -> None:
    rds.delete(f"{key}:done", f"{key}:first_start", f"{key}:last_finish")


def read_tally(rds: redis.Redis, key: str) -> Tally:
    done, first, last = rds.mget(f"{key}:done", f"{key}:first_start", f"{key}:last_finish")
    return Tally(int(done or 0), float(first or 0), float(last or 0))


def wait_for_tally(
    rds: redis.Redis, key: str, total: int, timeout: float, alive: Any = None
) -> Tally:
    """Wait until ``total`` inputs of the run counted themselves.

    ``alive``, when given, is a worker process that must not exit meanwhile.
    """
    try:
        wait_until(lambda: read_tally(rds, key).done >= total, timeout, f"{key}", alive)
    except (TimeoutError, RuntimeError) as exc:
        raise type(exc)(f"{exc}, at {read_tally(rds, key).done} of {total} inputs") from None
    return read_tally(rds, key)


class ProcessSampler:
    """Samples a process's thread count and resident memory on a thread of its own."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.max_threads = 0
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        try:
            self.max_threads = max(self.max_threads, thread_count(self.pid))
            self.max_rss = max(self.max_rss, rss_bytes(self.pid))
        except (OSError, RuntimeError):
            pass  # it exited; the earlier samples stand

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


class FirstMoment:
    """Watches ``predicate`` on a thread of its own: :attr:`at` is the first ``time.time()``
    at which it held (None if it never did). The thread stops once it has held."""

    def __init__(self, predicate: Callable[[], object], interval: float = POLL_SECONDS / 2):
        self.predicate = predicate
        self.interval = interval
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-moment", daemon=True)

    def __enter__(self) -> FirstMoment:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.predicate():
                self.at = time.time()
                return
            self._stop.wait(self.interval)


_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(port: int, function: str, timeout: float = 2.0) -> dict[str, float]:
    """A node's ``celery_concurrent_*`` samples of one function, by short name.

    E.g. ``{"containers": 3.0, "backlog": 120.0, "in_flight": 30.0, ...}`` from
    ``--concurrent-metrics-port``.
    """
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or not match.group(1).startswith("celery_concurrent_"):
            continue
        if dict(_LABEL.findall(match.group(2))).get("function") != function:
            continue
        found[match.group(1).removeprefix("celery_concurrent_")] = float(match.group(3))
    return found
