"""One function's pool of containers on this node: who runs, who drains, what crashed."""

from __future__ import annotations

import bisect
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..constants import BATCH_SIZE_BUCKETS, COLD_START_BUCKETS, CRASH_WINDOW_SECONDS
from ..contract import LoadReport
from ..spec import FunctionSpec
from .policy import ContainerState, crash_backoff

if TYPE_CHECKING:
    from .launcher import ContainerProcess


@dataclass
class Container:
    ident: str
    process: ContainerProcess
    started_at: float
    report: LoadReport | None = None
    #: a drain that has not finished after this long is forced
    drain_deadline: float | None = None

    @property
    def held(self) -> tuple[str, ...]:
        """The delivery tags it last said it holds unacknowledged (Redis)."""
        return self.report.held if self.report is not None else ()

    @property
    def ready(self) -> bool:
        return self.report is not None and self.report.ready

    def state(self, now: float) -> ContainerState:
        if self.report is None:
            return ContainerState(self.ident, in_flight=0, idle_for=0.0, starting=True)
        in_flight = self.report.in_flight
        idle_for = 0.0 if in_flight else max(0.0, now - self.report.busy_at)
        return ContainerState(
            self.ident, in_flight=in_flight, idle_for=idle_for, starting=not self.report.ready
        )


@dataclass
class ScaleEvent:
    at: float
    wall: float
    before: int
    after: int
    reason: str

    def describe(self) -> str:
        return f"{self.before} -> {self.after} containers ({self.reason})"


@dataclass
class ColdStarts:
    """Cumulative cold-start times: from a container's start to its first ready report."""

    bounds: tuple[float, ...] = COLD_START_BUCKETS
    #: observations per bucket (not cumulative); the last one is above every bound
    counts: list[int] = field(default_factory=lambda: [0] * (len(COLD_START_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self.total += seconds
            self.count += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(upper bound, cumulative count), ..., (inf, count)], sum, count)``."""
        with self._lock:
            running, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
                running += n
                buckets.append((bound, running))
            return buckets, self.total, self.count


@dataclass
class FunctionPool:
    """The containers of one function on this node."""

    spec: FunctionSpec
    containers: dict[str, Container] = field(default_factory=dict)
    retiring: dict[str, Container] = field(default_factory=dict)
    backlog: int = 0
    crashes: int = 0
    #: containers that exited to be rid of an input's thread they could not stop
    recycles: int = 0
    consecutive_crashes: int = 0
    backoff_until: float = 0.0
    last_error: str | None = None
    last_event: ScaleEvent | None = None
    scale_ups: int = 0
    scale_downs: int = 0
    cold_starts: ColdStarts = field(default_factory=ColdStarts)
    #: the batches (per size bucket) and items of containers that have exited
    exited_batch_sizes: list[int] = field(default_factory=lambda: [0] * len(BATCH_SIZE_BUCKETS))
    exited_batched_items: int = 0

    def batch_sizes(self) -> tuple[list[int], int]:
        """A ``@batched`` function's batches on this node, per bucket of
        ``BATCH_SIZE_BUCKETS``, and the items they held, since the node started."""
        counts, items = list(self.exited_batch_sizes), self.exited_batched_items
        for container in [*self.containers.values(), *self.retiring.values()]:
            report = container.report
            if report is not None and report.batch_sizes:
                counts = [a + b for a, b in zip(counts, report.batch_sizes, strict=False)]
                items += report.batched_items
        return counts, items

    @property
    def in_flight(self) -> int:
        return sum(c.report.in_flight for c in self.containers.values() if c.report)

    @property
    def live(self) -> int:
        return len(self.containers)

    def states(self, now: float) -> tuple[ContainerState, ...]:
        return tuple(c.state(now) for c in self.containers.values())

    def backing_off(self, now: float) -> bool:
        return now < self.backoff_until

    def record_event(
        self, before: int, after: int, reason: str, *, decided: bool = True
    ) -> ScaleEvent:
        """Record a change of size; only a policy decision counts as a scale-up or -down."""
        event = ScaleEvent(time.monotonic(), time.time(), before, after, reason)
        self.last_event = event
        if decided and after > before:
            self.scale_ups += 1
        elif decided and after < before:
            self.scale_downs += 1
        return event

    def record_ready(self, container: Container, now: float) -> None:
        """A container reported ready for the first time: observe its cold start."""
        self.cold_starts.observe(max(0.0, now - container.started_at))

    def forget(self, ident: str) -> Container | None:
        """Drop a container that has exited, running or retiring; return it."""
        gone = self.containers.pop(ident, None) or self.retiring.pop(ident, None)
        report = gone.report if gone is not None else None
        if report is not None and report.batch_sizes:
            self.exited_batch_sizes = [
                a + b for a, b in zip(self.exited_batch_sizes, report.batch_sizes, strict=False)
            ]
            self.exited_batched_items += report.batched_items
        return gone

    def record_crash(self, container: Container, error: str, now: float) -> float:
        """Count a crash (``error`` says how it ended); return the back-off before the
        next start."""
        self.crashes += 1
        if now - container.started_at < CRASH_WINDOW_SECONDS:
            self.consecutive_crashes += 1
        else:
            self.consecutive_crashes = 1
        delay = crash_backoff(self.consecutive_crashes)
        self.backoff_until = now + delay
        self.last_error = error
        if container.report is not None and container.report.error:
            self.last_error += f": {container.report.error}"
        return delay

    def record_healthy(self, now: float) -> None:
        """Forget a crash streak once a container has stayed up past the crash window."""
        if self.consecutive_crashes and any(
            c.ready and now - c.started_at >= CRASH_WINDOW_SECONDS for c in self.containers.values()
        ):
            self.consecutive_crashes = 0
            self.last_error = None

    @property
    def crash_looping(self) -> bool:
        return self.consecutive_crashes >= 3


def lowest_free_ident(taken: Iterable[str], prefix: str = "") -> str:
    """``prefix`` and the lowest number that no ident in ``taken`` has.

    Idents name containers (``<function>-<ident>@<host>``). Reusing the free ones keeps
    the set of names a node ever shows bounded, so Flower and other monitors see a few
    workers per function coming and going, not a new dead one after every scale-down.
    """
    used = set(taken)
    n = 1
    while f"{prefix}{n}" in used:
        n += 1
    return f"{prefix}{n}"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"
