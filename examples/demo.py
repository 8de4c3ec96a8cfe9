"""``make demo``: watch two functions scale up through a burst and back down to keep_warm.

It starts an embedded Redis (no system Redis needed; see :mod:`examples.harness` for
``CELERY_BROKER_URL``), a node (``celery -A examples.app worker -E``) and Flower on a
free port, then runs a scripted scenario:

1. a burst on ``fetch`` (sync, 20 inputs per container on threads) and ``ask`` (async,
   500 inputs per container on one event loop);
2. a live status table while the containers scale up and finish the burst;
3. the idle scale-down: after ``container_idle_timeout`` each function is back to its
   ``keep_warm``;
4. a summary: inputs, wall time, peak containers.

It exits by itself in well under a minute, or at Ctrl-C, and stops every process it
started. ``--quick`` runs a smaller burst (what the test suite runs).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from celery import group

from celery_concurrent import specs_of
from celery_concurrent.cli import WATCH_COLUMNS, render_table
from examples.harness import ExampleError, Stack, run_in_stack, status_rows

APP = "examples.app"
#: the status columns the demo shows, most telling first: a terminal too narrow for all of
#: them gets the first few (the queue names are long and say nothing new here)
COLUMNS = tuple(
    (key, dict(WATCH_COLUMNS)[key])
    for key in (
        "function",
        "containers_text",
        "in_flight",
        "backlog",
        "utilisation",
        "capacity",
        "last_event",
    )
)
SCALE_EVENT = re.compile(r"\] (\S+: \d+ -> \d+ containers.*)$")
BURST_TIMEOUT = 60.0


@dataclass
class Scenario:
    fetches: int
    asks: int
    pause: float

    @classmethod
    def of(cls, quick: bool) -> Scenario:
        return cls(fetches=40, asks=200, pause=0.0) if quick else cls(160, 1000, 2.0)


@dataclass
class Peaks:
    containers: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)

    def note(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            name = row["function"]
            self.containers[name] = max(self.containers.get(name, 0), row["containers"])
            self.in_flight[name] = max(self.in_flight.get(name, 0), row["in_flight"])


class LiveView:
    """The status table, redrawn in place on a terminal; piped, a frame per change.

    Below the table: a progress line and the node's scale decisions as it logs them.
    """

    def __init__(self, node_log: Path, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()
        self.node_log = node_log
        self.events: list[str] = []
        self._log_offset = 0
        self._drawn = 0
        self._last_shape: object = None
        self.started = time.monotonic()

    def new_events(self) -> list[str]:
        """Scale decisions the node has logged since the last call."""
        with open(self.node_log, errors="replace") as log:
            log.seek(self._log_offset)
            text = log.read()
        complete = text.rfind("\n") + 1
        self._log_offset += len(text[:complete].encode())
        found = [m.group(1) for m in map(SCALE_EVENT.search, text[:complete].splitlines()) if m]
        self.events += found
        return found

    def show(self, rows: list[dict[str, Any]], progress: str) -> None:
        fresh = self.new_events()
        stamp = f"t+{time.monotonic() - self.started:4.1f}s  {progress}"
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            table = _fitting_table(rows, width)
            lines = [stamp, table, "", "scale decisions (newest last):", *self.events[-6:]]
            block = [line[:width] for text in lines for line in text.splitlines() or [""]]
            up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            self.out.write(up + "\n".join(block) + "\n")
            self._drawn = len(block)
        else:
            for event in fresh:
                print(f"  scale: {event}", file=self.out)
            shape = [(r["function"], r["containers"], r["retiring"]) for r in rows]
            if shape != self._last_shape:
                print(f"{stamp}\n{render_table(rows, COLUMNS)}\n", file=self.out)
                self._last_shape = shape
        self.out.flush()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fitting_table(rows: list[dict[str, Any]], width: int) -> str:
    """The table with as many of :data:`COLUMNS` as fit the terminal (at least three)."""
    for count in range(len(COLUMNS), 3, -1):
        table = render_table(rows, COLUMNS[:count])
        if max(map(len, table.splitlines())) <= width:
            return table
    return render_table(rows, COLUMNS[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller burst (for tests)")
    args = parser.parse_args(argv)
    return run_in_stack(APP, lambda stack: run(stack, Scenario.of(args.quick)), what="demo")


def run(stack: Stack, scenario: Scenario) -> int:
    from examples.app import app, ask, fetch

    specs = specs_of(app)
    print(stack.describe())
    stack.purge(app)
    # A name of its own: on a shared broker another node may well be celery@host.
    name = "demo@%h" if stack.embedded_broker else f"demo-{os.getpid()}@%h"
    node = stack.start_node("-E", "-c", "1", "-n", name, wait=False)
    flower = stack.start_flower()
    stack.wait_ready(node)
    print(f"Flower:   {flower.url}  (open it: one worker per container)")
    print(f"node log: {stack.log_path(node)}")
    print(f"by hand:  celery -A {APP} worker -E   |   celery -A {APP} concurrent status --watch\n")
    keep_warm = {name: spec.min_containers for name, spec in specs.items()}
    view = LiveView(stack.log_path(node))
    peaks = Peaks()
    rows: list[dict[str, Any]] = []

    def poll() -> list[dict[str, Any]]:
        nonlocal rows
        fresh = status_rows(app)
        if fresh and all(row["nodes"] for row in fresh):  # else keep the last answer
            rows = fresh
            peaks.note(rows)
        return rows

    def warm(rows: list[dict[str, Any]]) -> bool:
        return bool(rows) and all(r["ready"] >= keep_warm[r["function"]] for r in rows)

    started = time.monotonic()
    while not warm(poll()) or time.monotonic() - started < scenario.pause:
        if time.monotonic() - started > BURST_TIMEOUT:
            raise ExampleError("the keep_warm containers did not start")
        view.show(rows, "keep_warm containers start with the node; the burst comes next")
        time.sleep(0.3)

    total = scenario.fetches + scenario.asks
    print(
        f"burst: {scenario.fetches} x fetch (sleeps 0.5 s) and {scenario.asks} x ask "
        f"(awaits 1 s), all sent at once\n",
        flush=True,
    )
    started = time.monotonic()
    fetches = group(fetch.s(f"https://example.com/{i}") for i in range(scenario.fetches))
    asks = group(ask.s(f"question {i}") for i in range(scenario.asks))
    results = [fetches.apply_async(), asks.apply_async()]
    while not all(result.ready() for result in results):
        if time.monotonic() - started > BURST_TIMEOUT:
            raise ExampleError(f"the burst did not finish within {BURST_TIMEOUT:.0f}s")
        waiting = sum((row["backlog"] or 0) + row["in_flight"] for row in poll())
        view.show(rows, f"burst: {max(0, total - waiting)}/{total} inputs done")
    wall = time.monotonic() - started
    done = sum(len(result.get(timeout=30)) for result in results)

    idle_since = time.monotonic()
    longest_window = max(spec.scaledown_window for spec in specs.values())
    deadline = idle_since + longest_window + 30.0
    while True:
        poll()
        idle = time.monotonic() - idle_since
        view.show(rows, f"idle for {idle:.0f}s; containers retire after container_idle_timeout")
        if all(r["containers"] == keep_warm[r["function"]] and not r["retiring"] for r in rows):
            break
        if time.monotonic() > deadline:
            raise ExampleError("the containers did not scale down to keep_warm")
        time.sleep(0.3)
    scaled_down = time.monotonic() - idle_since

    serial = scenario.fetches * 0.5 + scenario.asks * 1.0
    print("\nsummary")
    print(f"  inputs          {done} ({scenario.fetches} fetch, {scenario.asks} ask), all done")
    print(f"  wall time       {wall:.1f} s for the burst (one at a time: {serial:.0f} s)")
    for name in sorted(specs):
        spec = specs[name]
        print(
            f"  {name:<20} peak {_count(peaks.containers.get(name, 0), 'container')} "
            f"(max {spec.max_containers}), peak {peaks.in_flight.get(name, 0)} inputs in "
            f"flight; back to keep_warm={spec.min_containers}"
        )
    print(f"  scale-down      every function at keep_warm {scaled_down:.1f} s after the burst")
    print(f"  scale decisions {len(view.events)} (see above)")
    return 0 if done == total else 1


if __name__ == "__main__":
    sys.exit(main())
