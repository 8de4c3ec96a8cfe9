"""``celery worker`` subprocesses for the tests, the examples and the benchmarks.

Each worker runs in a session of its own (no terminal's Ctrl-C reaches it), writes its
output to a log file, and is stopped by its PID and its process group, which also holds
what it started (a node's fork server and containers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from devkit import ROOT
from devkit.servers import stop_processes

#: how long a stopping worker may take before its process group is killed
STOP_GRACE = 10.0


class Workers:
    """Starts ``celery worker`` subprocesses on one broker and stops every one of them.

    Use it as a context manager, or call :meth:`stop_all` in a ``finally`` block: either
    way every worker is stopped on any exit, an exception, Ctrl-C or a timeout.

    Parameters
    ----------
    broker_url:
        ``CELERY_BROKER_URL`` of every worker.
    logdir:
        Where each worker's output goes, ``worker-<n>.log``.
    """

    def __init__(self, broker_url: str, logdir: Path) -> None:
        self.broker_url = broker_url
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment, with the broker, the repository on ``PYTHONPATH``
        and unbuffered output; then ``extra``."""
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
        """``celery -A APP worker -l INFO ARGS`` (a later ``-l`` in ``args`` wins); by
        default wait for its `` ready.`` line."""
        log = self.logdir / f"worker-{len(self._logs)}.log"
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-l", "INFO", *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        self._logs[proc.pid] = log
        if wait_ready:
            self.wait_for_log(proc, " ready.", ready_timeout)
        return proc

    def wait_for_log(
        self,
        proc: subprocess.Popen[bytes],
        text: str,
        timeout: float,
        error: type[Exception] | None = None,
    ) -> None:
        """Wait until the worker's log holds ``text``, with the log's tail in the error if
        it exits first (``RuntimeError``) or the time runs out (``TimeoutError``).

        ``error``, when given, is raised in both cases instead.
        """
        deadline = time.monotonic() + timeout
        while text not in self.log_of(proc):
            if proc.poll() is not None:
                raise (error or RuntimeError)(
                    f"the worker exited ({proc.returncode}):\n{self.tail(proc)}"
                )
            if time.monotonic() > deadline:
                raise (error or TimeoutError)(
                    f"no {text!r} in the worker's log within {timeout:g}s:\n{self.tail(proc)}"
                )
            time.sleep(0.05)

    def log_path(self, proc: subprocess.Popen[bytes]) -> Path:
        return self._logs[proc.pid]

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.log_path(proc).read_text(errors="replace")

    def tail(self, proc: subprocess.Popen[bytes], chars: int = 3000) -> str:
        """The end of the worker's log, for an error message."""
        return self.log_of(proc)[-chars:]

    def stop(
        self, proc: subprocess.Popen[bytes], grace: float = STOP_GRACE, *, drain: bool = False
    ) -> None:
        """Stop one worker now, its process group too (``drain``: as in :meth:`stop_all`)."""
        stop_processes([proc], grace, drain=drain)
        self.procs.remove(proc)

    def stop_all(
        self,
        grace: float = STOP_GRACE,
        *,
        drain: bool = False,
        hurry: threading.Event | None = None,
    ) -> None:
        """Stop every worker still listed, all at once (:func:`devkit.servers.stop_processes`:
        ``drain`` for a node's warm shutdown, ``hurry`` to cut the grace period short)."""
        procs, self.procs = self.procs, []
        stop_processes(procs, grace, drain=drain, hurry=hurry)
