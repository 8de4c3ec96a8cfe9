"""Helpers the tests share, on top of :mod:`devkit` (a private Redis server, real worker
processes, waiting): the nodes' status rows, the test apps' counters, and a module run as
a subprocess with every process it starts.

Every process started here is stopped by its PID (and its process group), even when
the test that started it fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import redis

from devkit import ROOT
from devkit.bursts import burst, publish_template
from devkit.processes import containers_of, descendants, rss_bytes, thread_count
from devkit.servers import RedisServer, free_port
from devkit.waiting import wait_for
from devkit.workers import Workers

__all__ = [
    "ROOT",
    "ModuleRun",
    "RedisServer",
    "Workers",
    "burst",
    "containers_of",
    "descendants",
    "free_port",
    "publish_template",
    "rss_bytes",
    "thread_count",
    "wait_for",
]


#: how long to wait for the nodes' answers to a broadcast, asked again with the next
#: while no node has answered: a node on a loaded machine answers late
ANSWER_TIMEOUTS = (0.5, 1.0, 2.0, 4.0, 8.0)


def row(app_module: Any, name: str) -> dict[str, Any]:
    """The nodes' status row of ``name`` (asked again, waiting longer, if no node answered)."""
    from celery_concurrent.cli import collect_status

    for timeout in ANSWER_TIMEOUTS:
        for found in collect_status(app_module.app, timeout=timeout):
            if found["function"] == name and found["nodes"]:
                return found
    raise AssertionError(f"no node reported {name}")


def running(store: redis.Redis, key: str) -> int:
    """How many inputs of ``key`` run now, as the test apps count them (``running:<key>``)."""
    return int(store.get(f"running:{key}") or 0)


def done(store: redis.Redis, key: str) -> int:
    """How many inputs of ``key`` have finished (``done:<key>``)."""
    return int(store.get(f"done:{key}") or 0)


# -- a module run as a subprocess, and every process it starts -------------------------

#: the environment variable that marks every process of one :class:`ModuleRun`
TOKEN_ENV = "CC_RUN_TOKEN"


def processes_carrying(token: str) -> dict[int, str]:
    """Live processes whose environment holds ``TOKEN_ENV=token``: pid -> command line."""
    marker = f"{TOKEN_ENV}={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                found[int(entry)] = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or a zombie
    return found


class ModuleRun:
    """``python -m MODULE ARGS`` in a session of its own, with its output read line by line.

    Every process it starts inherits its token (:data:`TOKEN_ENV`), so what it leaves
    behind is found even where it left its process group (a worker in a session of its
    own, an orphan that init adopted).
    """

    def __init__(self, module: str, *args: str, env: dict[str, str | None] | None = None) -> None:
        self.token = uuid.uuid4().hex
        environ = {**os.environ, "PYTHONPATH": str(ROOT), TOKEN_ENV: self.token}
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}:\n{self.output[-4000:]}")

    def finish(self, timeout: float) -> int:
        """Wait for the exit; then no process it started may be left."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self._reader.join(5)
            while not self._queue.empty():
                line = self._queue.get_nowait()
                if line is not None:
                    self.lines.append(line)
            self.stop()
        assert self.proc.returncode is not None, f"still running after {timeout}s"
        return self.proc.returncode

    def stop(self) -> None:
        """Kill the run and whatever it left (by PID), and say what was left."""
        left = self.kill()
        if left:
            raise AssertionError(f"processes left running: {left}\n{self.output[-3000:]}")

    def kill(self) -> dict[int, str]:
        """Kill the run and every process still carrying its token; return those."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # Processes killed with their group are reaped by init a moment later.
        left: dict[int, str] = {}
        for _ in range(30):
            left = processes_carrying(self.token)
            if not left:
                return left
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left
