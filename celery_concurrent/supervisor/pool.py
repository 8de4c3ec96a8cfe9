"""One function's pool of containers: start, retire (drain), reap, and crash back-off."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from celery.utils.log import get_logger

from ..contract import LoadReport
from ..spec import FunctionSpec
from .launcher import ContainerProcess
from .policy import ContainerState

logger = get_logger(__name__)

#: a container that exits within this many seconds of starting counts toward a crash loop
CRASH_WINDOW_SECONDS = 30.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
#: upper bounds (seconds) of the cold-start histogram's buckets; a fork-server start is
#: about 0.1 s, an exec'd (gevent) one about 1 s
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Container:
    ident: str
    process: ContainerProcess
    started_at: float
    report: LoadReport | None = None
    retiring_since: float | None = None
    #: a drain that has not finished after this long is forced
    drain_deadline: float | None = None
    #: when its first ready report arrived
    ready_at: float | None = None

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
    consecutive_crashes: int = 0
    backoff_until: float = 0.0
    last_error: str | None = None
    last_event: ScaleEvent | None = None
    scale_ups: int = 0
    scale_downs: int = 0
    events: deque[ScaleEvent] = field(default_factory=lambda: deque(maxlen=50))
    cold_starts: ColdStarts = field(default_factory=ColdStarts)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_ident(self) -> str:
        return str(next(self._ids))

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
        self.events.append(event)
        if decided and after > before:
            self.scale_ups += 1
        elif decided and after < before:
            self.scale_downs += 1
        return event

    def record_ready(self, container: Container, now: float) -> None:
        """A container reported ready for the first time: observe its cold start."""
        container.ready_at = now
        self.cold_starts.observe(max(0.0, now - container.started_at))

    def record_crash(self, container: Container, exitcode: int | None, now: float) -> float:
        """Count a crash; return the back-off (seconds) before the next start."""
        self.crashes += 1
        if now - container.started_at < CRASH_WINDOW_SECONDS:
            self.consecutive_crashes += 1
        else:
            self.consecutive_crashes = 1
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (self.consecutive_crashes - 1))
        self.backoff_until = now + delay
        self.last_error = describe_exit(exitcode)
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
        import signal

        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"
