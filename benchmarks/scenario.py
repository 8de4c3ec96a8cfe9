"""The scenario harness: what every benchmark's ``main`` runs in.

A benchmark declares its sides (ours, plain Celery, a peer) and its measurement; the
harness gives it the rest:

- :class:`Bench`: its options (``--output`` among them), a private Redis, the app
  (:mod:`benchmarks.apps`) pointed at it, and workers; every process is stopped by its
  PID when the block ends, however it ends; then the JSON report
  (``benchmarks/results/<name>.json``) with the command, the versions and the load;
- :func:`rotations`: the order of the rounds, each side leading in turn;
- :func:`run_main`: every way of stopping a benchmark runs its clean-up.

So a benchmark reads::

    bench = Bench("overhead", options(), argv)
    with bench:
        proc = bench.start("-P", "threads", ...)
        ...                                    # the measurement
    bench.write(parameters, workers, results, runs=[...])
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from celery_concurrent import spec_of
from celery_concurrent.spec import FunctionSpec
from devkit import ROOT
from devkit.servers import RedisServer
from devkit.workers import Workers

#: the app every scenario's workers run
APP = "benchmarks.apps"
RESULTS = Path(__file__).resolve().parent / "results"
#: what ends a benchmark as Ctrl-C does: ``timeout`` and run_all send SIGTERM, a closed
#: terminal SIGHUP
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

T = TypeVar("T")


def options(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line, and ``--output``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS / f"{name}.json")
    return parser


class Bench:
    """One run of a benchmark: its options, a private Redis, the app on it and its workers.

    The block starts the Redis and points the app at it (the app reads its broker when
    imported); its exit stops every worker and the Redis by their PIDs. :meth:`write`,
    after the block, writes the report: an interrupted run writes none.

    Parameters
    ----------
    name:
        The scenario, ``bench_<name>`` and ``results/<name>.json``.
    parser:
        Its options (:func:`options` and more).
    argv:
        The command line (``sys.argv[1:]`` when None), also the report's ``command``.
    """

    def __init__(self, name: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
        self.name = name
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.args = parser.parse_args(self.argv)
        self.load_before = os.getloadavg()
        self.load_after = self.load_before
        self.began = time.monotonic()
        self.server = RedisServer()
        self.logdir = Path(tempfile.mkdtemp(prefix="cc-bench-"))
        self.workers = Workers(self.server.url, self.logdir)

    def __enter__(self) -> Bench:
        try:
            self.server.start()
            os.environ["CELERY_BROKER_URL"] = self.server.url
            #: :mod:`benchmarks.apps`, imported once the broker is known, and its app
            self.apps: Any = importlib.import_module(APP)
            self.app: Any = self.apps.app
            self.rds = redis.Redis.from_url(self.server.url)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.workers.stop_all()
        finally:
            self.server.stop()
            shutil.rmtree(self.logdir, ignore_errors=True)
            self.load_after = os.getloadavg()

    # -- during the run --------------------------------------------------------------

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``celery -A benchmarks.apps worker ARGS``, not waiting for it to be ready."""
        return self.workers.start(APP, *args, env=env, wait_ready=False)

    def spec(self, task: str) -> FunctionSpec:
        """The ``@concurrent`` spec of one of the app's tasks."""
        spec = spec_of(self.app.tasks[task])
        assert spec is not None, task
        return spec

    # -- after it --------------------------------------------------------------------

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.began

    def environment(self) -> dict[str, Any]:
        """What the run saw: versions, CPUs, the machine's load (``os.getloadavg()``)."""
        return {
            "python": platform.python_version(),
            "celery": importlib.import_module("celery").__version__,
            "kombu": importlib.import_module("kombu").__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m_before": self.load_before[0],
            "load_average_1m_after": self.load_after[0],
            "seconds": self.seconds,
        }

    def write(
        self,
        parameters: dict[str, Any],
        workers: dict[str, str],
        results: dict[str, Any],
        **records: Any,
    ) -> None:
        """Print the load, then write the report; ``records`` are its lists of runs."""
        print(
            f"load average before/after: {self.load_before[0]:.2f} / {self.load_after[0]:.2f}; "
            f"took {self.seconds:.0f} s"
        )
        report = {
            "benchmark": self.name,
            "command": " ".join([python_path(), "-m", f"benchmarks.bench_{self.name}", *self.argv]),
            "parameters": parameters,
            "workers": workers,
            "results": results,
            **records,
            "environment": self.environment(),
        }
        output: Path = self.args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")


def worker_command(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """How a side's worker is started, as a user would type it."""
    prefix = [f"{name}={value}" for name, value in (env or {}).items()]
    return " ".join([*prefix, "celery -A", APP, "worker", *args])


@dataclass(frozen=True)
class WorkerSide:
    """One side of a benchmark: a worker of ``app`` that runs ``task`` from ``queue``."""

    name: str
    task: str
    queue: str
    worker_args: tuple[str, ...]
    app: str = APP

    @property
    def command(self) -> str:
        return worker_command(self.worker_args).replace(APP, self.app, 1)


def rotations(sides: Sequence[T], rounds: int, warm_up: bool = False) -> list[tuple[int, T]]:
    """``(round, side)`` in the order they run: each round the next side leads, so that a
    drift of the machine weighs on all alike. With ``warm_up``, round -1 comes first (the
    fork server, the thread pools, the page cache), not to be counted."""
    first = -1 if warm_up else 0
    return [
        (round_no, side)
        for round_no in range(first, rounds)
        for side in [*sides[round_no % len(sides) :], *sides[: round_no % len(sides)]]
    ]


def python_path() -> str:
    """The interpreter, relative to the repository when it is the project's virtualenv."""
    path = Path(sys.executable)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_main(main: Callable[[], int]) -> int:
    """``main()``'s exit status, with every way of stopping it running its ``finally``
    blocks, which stop the workers and the Redis it started by their PIDs.

    The workers run in sessions of their own, so nothing but the benchmark stops them:
    SIGTERM and SIGHUP raise ``KeyboardInterrupt`` as Ctrl-C does (also where the shell
    started it with SIGINT ignored, ``cmd &``). Once it is stopping, more of these
    signals are only noted: a second Ctrl-C cannot cut the clean-up short, and each of
    its steps is bounded by a grace period. Exit status 130 after an interruption.
    """

    def stopping(signum: int, frame: object) -> None:
        print(f"({signal.Signals(signum).name}: still stopping)", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        for each in STOP_SIGNALS:
            signal.signal(each, stopping)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for each in STOP_SIGNALS:
        signal.signal(each, interrupt)
    try:
        return main()
    except KeyboardInterrupt as exc:
        print(
            f"\ninterrupted ({exc or 'SIGINT'}): every process it started is stopped",
            file=sys.stderr,
            flush=True,
        )
        return 130
