"""What the scenario benchmarks share: publishing inputs, reading a run's tally, the
environment a run saw, sampling a process's threads and memory, the moment something
first holds, and a node's metrics.
(A burst at one instant, :func:`tests.support.burst`, is the tests' too.)

Each benchmark is a module with a ``main(argv)`` that starts its own Redis and its own
workers, stops every process it started by its PID, and writes
``benchmarks/results/<name>.json``; :mod:`benchmarks.run_all` runs them all. Each runs
its ``main`` through :func:`run_main`, so that it stops them however it ends.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.request import urlopen

import redis

from tests.support import rss_bytes, thread_count

#: how often a burst waits for its run to finish, and a sampler looks at a process
POLL_SECONDS = 0.01
#: what ends a benchmark as Ctrl-C does: ``timeout`` and run_all send SIGTERM, a closed
#: terminal SIGHUP
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_main(main: Callable[[], int]) -> int:
    """``main()``'s exit status, with every way of stopping it running its ``finally``
    blocks, which stop the workers and the Redis it started by their PIDs.

    The workers run in sessions of their own, so nothing but the benchmark stops them:
    SIGTERM and SIGHUP raise ``KeyboardInterrupt`` as Ctrl-C does (also where the shell
    started it with SIGINT ignored, ``cmd &``). Once it is stopping, more of these
    signals are only noted: a second Ctrl-C cannot cut the clean-up short, and each of
    its steps is bounded by a grace period. Exit status 130 after an interruption.
    """

    def stopping(signum: int, frame: object) -> None:
        print(f"({signal.Signals(signum).name}: still stopping)", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        for each in STOP_SIGNALS:
            signal.signal(each, stopping)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for each in STOP_SIGNALS:
        signal.signal(each, interrupt)
    try:
        return main()
    except KeyboardInterrupt as exc:
        print(
            f"\ninterrupted ({exc or 'SIGINT'}): every process it started is stopped",
            file=sys.stderr,
            flush=True,
        )
        return 130


def environment(
    load_before: tuple[float, ...], load_after: tuple[float, ...], seconds: float | None = None
) -> dict[str, Any]:
    """What the run saw: versions, CPUs and the machine's load (``os.getloadavg()``)."""
    found = {
        "python": platform.python_version(),
        "celery": importlib.import_module("celery").__version__,
        "kombu": importlib.import_module("kombu").__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_1m_before": load_before[0],
        "load_average_1m_after": load_after[0],
    }
    return found if seconds is None else {**found, "seconds": seconds}


def publish(app: Any, task_name: str, args: tuple[Any, ...], total: int, queue: str) -> float:
    """Publish ``total`` inputs of a task to ``queue``; return how long it took."""
    task = app.tasks[task_name]
    began = time.monotonic()
    with app.producer_or_acquire() as producer:
        for _ in range(total):
            task.apply_async(args, producer=producer, queue=queue, routing_key=queue)
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
    deadline = time.monotonic() + timeout
    while True:
        tally = read_tally(rds, key)
        if tally.done >= total:
            return tally
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{key}: the worker exited ({alive.returncode}) at {tally.done}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {tally.done} of {total} inputs within {timeout}s")
        time.sleep(POLL_SECONDS)


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
