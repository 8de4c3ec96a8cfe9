"""Helpers the tests share: a private Redis server and real worker processes.

Every process started here is stopped by its PID (and its process group), even when
the test that started it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from celery_concurrent.testing import RedisServer, free_port, redis_server_binary, stop_process

__all__ = ["RedisServer", "Workers", "free_port", "redis_server_binary", "stop_process"]

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class Workers:
    """Starts ``celery worker`` subprocesses and stops every one of them at the end."""

    def __init__(self, broker_url: str, logdir: Path) -> None:
        self.broker_url = broker_url
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CELERY_BROKER_URL=self.broker_url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra or {})
        return env

    def start(
        self,
        app: str,
        *args: str,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        wait_ready: bool = True,
    ) -> subprocess.Popen[bytes]:
        log = self.logdir / f"worker-{len(self.procs)}.log"
        cmd: Sequence[str] = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-l",
            "INFO",
            *args,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        if wait_ready:
            self.wait_for_log(proc, " ready.", ready_timeout)
        return proc

    def wait_for_log(self, proc: subprocess.Popen[bytes], text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log: Path = proc.log_path  # type: ignore[attr-defined]
        while time.monotonic() < deadline:
            if text in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {text!r} within {timeout}s:\n{log.read_text()[-3000:]}")

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s")


def row(app_module: Any, name: str) -> dict[str, Any]:
    """The nodes' status row of ``name`` (asked again if a node was slow to answer)."""
    from celery_concurrent.cli import collect_status

    for _ in range(5):
        for found in collect_status(app_module.app, timeout=0.5):
            if found["function"] == name and found["nodes"]:
                return found
    raise AssertionError(f"no node reported {name}")


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError(f"no thread count for {pid}")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RSS for {pid}")
