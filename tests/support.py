"""Helpers the tests share: a private Redis server and real worker processes.

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import redis

from devkit.servers import RedisServer, free_port, redis_server_binary, stop_process
from devkit.waiting import wait_for

__all__ = [
    "ModuleRun",
    "RedisServer",
    "Workers",
    "free_port",
    "redis_server_binary",
    "stop_process",
    "stop_processes",
    "wait_for",
]

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
        ready_timeout: float = 60.0,
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
        stop_processes(self.procs)
        self.procs.clear()


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """Stop processes and their process groups, all at once: SIGTERM to every group,
    then SIGKILL to every group after ``grace`` seconds.

    All at once, so that stopping many workers takes one grace period, not one each.
    A Ctrl-C or SIGTERM during the grace period cuts it short: whatever is left is
    killed before the interruption goes on, so that no worker outlives an impatient
    second Ctrl-C.
    """
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    interrupted: BaseException | None = None
    try:
        deadline = time.monotonic() + grace
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
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


def publish_template(
    app: Any, rds: redis.Redis, task_name: str, args: tuple[Any, ...], total: int, template: str
) -> list[Any]:
    """Publish ``total`` inputs once into the Redis list ``template``, for :func:`burst`;
    return their results (``AsyncResult``).

    The messages name the template as their routing key; the Redis transport delivers
    a message to the queue it was popped from, whatever its routing key says.
    """
    task = app.tasks[task_name]
    rds.delete(template)
    with app.producer_or_acquire() as producer:
        results = [
            task.apply_async(args, producer=producer, queue=template, routing_key=template)
            for _ in range(total)
        ]
    assert rds.llen(template) == total, (template, rds.llen(template))
    return results


def burst(rds: redis.Redis, template: str, queue: str) -> float:
    """Put a whole template of inputs in ``queue`` at once; return ``time.time()`` then.

    ``COPY`` makes the queue in one step, so the burst arrives at one instant, however
    long publishing it took (seconds, on a loaded machine); a worker blocked on
    ``BRPOP`` wakes at once.
    """
    began = time.time()
    rds.copy(template, queue, replace=True)
    return began


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


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def children(pid: int) -> list[psutil.Process]:
    """The processes ``pid`` started itself (none once it is gone)."""
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def containers_of(node_pid: int) -> list[psutil.Process]:
    """A node's forked containers, draining ones too: the children of its fork server.

    Read from ``/proc`` in a millisecond, so a test can watch them as fast as they
    change, where a status broadcast takes half a second or more.
    """
    for child in children(node_pid):
        try:
            if "forkserver" in " ".join(child.cmdline()):
                return child.children()
        except psutil.NoSuchProcess:
            continue
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
