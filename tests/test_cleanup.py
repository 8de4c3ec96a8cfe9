"""Every benchmark and example stops what it started, however it ends: here, one of each
(``bench_burst``, ``make demo``) interrupted half-way by Ctrl-C (SIGINT) or by SIGTERM
(``timeout``, ``kill``, run_all). The examples share the demo's harness
(:class:`examples.harness.Stack`), the benchmarks theirs (:mod:`benchmarks.scenario`), and
both start their workers with :class:`devkit.workers.Workers`.

Each runs as a subprocess in a session of its own, as from a terminal. Its workers, nodes
and Redis run in sessions of their own too, which no signal to it reaches: only its own
clean-up can stop them. What it started is read from ``/proc`` before the interruption
and must all be gone soon after; whatever the outcome, anything left is killed here by
its PID.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from .support import ModuleRun, descendants

INTERRUPTIONS = [
    pytest.param(signal.SIGINT, id="ctrl-c"),
    pytest.param(signal.SIGTERM, id="sigterm"),
]
#: a short bench_burst: four workers (ours, threads, gevent, prefork) and a Redis, a few
#: rounds of 200 short inputs each
SHORT_BURST = ("--inputs", "200", "--seconds", "0.1", "--rounds", "3")
SHORT_BURST += ("--prefork-inputs", "4", "--prefork-rounds", "1")
#: how long the stopping may take: every worker's grace period runs at once
STOP_TIMEOUT = 60


def interrupt_half_way(run: ModuleRun, line: str, signum: int, workers: int) -> None:
    """Wait for ``line``, note every process below the run, send it ``signum``; then it
    must exit by itself (130), having stopped every one of them, its Redis too.

    SIGINT goes to the run's process group, as a terminal's Ctrl-C does; SIGTERM to the
    run alone, as ``timeout`` and ``kill`` send it. Whatever happens, what is left is
    killed by its PID.
    """
    started: list[psutil.Process] = []
    try:
        run.wait_for_line(line, 120)
        started = descendants(run.proc.pid)
        running = commands(started)
        assert sum("redis-server" in c for c in running) == 1, running
        assert sum(" worker " in c for c in running) >= workers, running
        if signum == signal.SIGINT:
            os.killpg(run.proc.pid, signum)
        else:
            os.kill(run.proc.pid, signum)
        code = run.proc.wait(STOP_TIMEOUT)
        _, alive = psutil.wait_procs(started, timeout=STOP_TIMEOUT)
        assert not alive, f"left running: {commands(alive)}\n{run.output[-3000:]}"
        assert code == 130, run.output[-3000:]
        # No process it started after the snapshot is left either.
        assert run.finish(STOP_TIMEOUT) == 130
    finally:
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        run.kill()


def commands(processes: list[psutil.Process]) -> list[str]:
    found = []
    for process in processes:
        try:
            found.append(" ".join(process.cmdline()) or process.name())
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.parametrize("signum", INTERRUPTIONS)
def test_an_interrupted_benchmark_stops_its_workers_and_its_redis(signum, tmp_path: Path):
    output = tmp_path / "burst.json"
    run = ModuleRun("benchmarks.bench_burst", *SHORT_BURST, "--output", str(output))
    # Half-way: all four workers are up and have served a round.
    interrupt_half_way(run, "round 1 ", signum, workers=4)
    assert "interrupted" in run.output and "every process it started is stopped" in run.output
    assert not output.exists()  # an interrupted run writes no result


@pytest.mark.parametrize("signum", INTERRUPTIONS)
def test_an_interrupted_demo_stops_its_node_containers_flower_and_redis(signum):
    # ``make demo`` on an embedded Redis of its own, which it must stop too.
    embedded = {"CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None}
    run = ModuleRun("examples.demo", "--quick", env=embedded)
    # Half-way: the node, its keep_warm containers and Flower are up, the burst is sent.
    interrupt_half_way(run, "burst:", signum, workers=1)
    assert "interrupted: every process the demo started is stopped" in run.output
