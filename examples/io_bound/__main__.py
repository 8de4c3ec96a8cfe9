"""``python -m examples.io_bound``: the same slow HTTP calls through three functions.

A local server answers every GET after ``--delay`` seconds and counts how many requests
it holds at once. The calls go through a plain Celery task (the node's prefork pool,
``-c 2``), the sync ``@concurrent`` function (threads) and the async one (asyncio tasks).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from celery import group

from examples.harness import (
    ExampleError,
    Stack,
    example_parser,
    report,
    results_of,
    run_in_stack,
    wait_for_containers,
)

from .server import BODY, SlowHTTPServer

APP = "examples.io_bound.app"
HOW = {
    "get_plain": "a plain task: one call per worker process (-c 2)",
    "get_sync": "sync: 20 threads per container, up to 2 containers",
    "get_async": "async: 200 asyncio tasks on one event loop, 1 container",
}


def main(argv: list[str] | None = None) -> int:
    parser = example_parser("python -m examples.io_bound", __doc__, "20 calls of 0.5 s")
    parser.add_argument("--calls", type=int, default=60, help="GETs per function (default 60)")
    parser.add_argument("--delay", type=float, default=0.25, help="the server's answer time")
    args = parser.parse_args(argv)
    if args.quick:
        # Half a second per call: long enough that a container has taken in all 20 before
        # the first answer comes, even on a loaded machine, so the server sees them at once.
        args.calls, args.delay = 20, 0.5

    def body(stack: Stack) -> int:
        rows = run(stack, args.calls, args.delay)
        return report(
            ("FUNCTION", "RUNS AS", "CALLS", "WALL", "CALLS/S", "AT ONCE (seen by the server)"),
            (
                (
                    short,
                    HOW[short],
                    r["calls"],
                    f"{r['wall_s']:.2f} s",
                    f"{r['calls_per_s']:.0f}",
                    r["peak_at_once"],
                )
                for r in rows
                for short in [r["function"].rsplit(".", 1)[1]]
            ),
            rows,
            args.json,
        )

    return run_in_stack(APP, body)


def run(stack: Stack, calls: int, delay: float) -> list[dict[str, Any]]:
    with SlowHTTPServer(delay) as server:
        return measure(stack, server, calls)


def measure(stack: Stack, server: SlowHTTPServer, calls: int) -> list[dict[str, Any]]:
    from .app import app, get_async, get_plain, get_sync

    print(stack.describe())
    stack.purge(app)
    stack.start_node("-c", "2")
    wait_for_containers(app, {get_sync.name: 1, get_async.name: 1})
    print(f"{calls} GETs to {server.url}, which answers each after {server.delay} s:\n")
    rows = []
    for task in (get_plain, get_sync, get_async):
        label = task.name.rsplit(".", 1)[1]
        started = time.monotonic()
        result = group(task.s(f"{server.url}/{label}/{i}") for i in range(calls)).apply_async()
        sizes = results_of(result)
        wall = time.monotonic() - started
        if sizes != [len(BODY)] * calls:
            raise ExampleError(f"{task.name} returned {sizes[:5]}...")
        rows.append(
            {
                "function": task.name,
                "calls": calls,
                "wall_s": wall,
                "calls_per_s": calls / wall,
                "peak_at_once": server.peak[label],
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
