"""Intake: how fast one container takes in inputs, against plain Celery and the peers.

Run it with ``python -m benchmarks.bench_intake`` from the repository root.

Two measurements, with a Redis result backend on every side:

1. **Intake rate.** ``K`` no-op inputs (10,000) wait in the queue, published with
   ``apply_async`` (or the peer's own client) while no worker runs; then the worker
   starts and takes them in. The rate is ``(K - 1) / (last start - first start)``, so
   the worker's start-up is left out. It is measured twice for ours and plain Celery:
   with each input's result stored, and with ``apply_async(ignore_result=True)``, the
   worker's intake alone. Sides: ours, one container of an ``async def``
   ``@concurrent(max_inputs=10000)`` function, which takes up to its free slots per
   round trip (``container/intake.py``); plain Celery ``-P threads -c 100`` with its
   default prefetch (400), which takes one message per ``BRPOP``; Taskiq
   (``--max-async-tasks 10000``) and arq (``max_jobs=10000``) on the same async no-op.
2. **Live.** ``K`` inputs of ``asyncio.sleep(1)`` published in a loop to a worker that is
   already running: from the last publish to the last input ending (the floor is 1 s,
   the sleep). Sides: ours, Taskiq and arq (plain Celery has no way to run a coroutine
   without a thread per input; ``bench_density`` measures that).

Each input stamps its start and end in its own process (:mod:`benchmarks.stamps`). The
report gives the medians over the rounds and the ratios ours/other. It writes
``benchmarks/results/intake.json``.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import peers, stamps
from benchmarks.common import publish, spread
from benchmarks.scenario import Bench, options, rotations, run_main
from devkit.servers import stop_processes

APP = "benchmarks.refill_app"
QUIET = ("-l", "WARNING", "--without-gossip", "--without-mingle")
PLAIN_CONCURRENCY = 100
#: with a result stored for each input (as every side runs), and with none (ours and
#: plain Celery only: ``apply_async(ignore_result=True)``), the worker's intake alone
INTAKE_KINDS = ("intake", "intake, results ignored")


@dataclass(frozen=True)
class Run:
    side: str
    kind: str
    round: int
    #: intake: inputs taken in per second; live: seconds from the last publish to the end
    value: float
    publish_s: float


class Sides:
    def __init__(self, bench: Bench, inputs: int) -> None:
        self.bench = bench
        self.app: Any = importlib.import_module(APP)
        self.app.app.conf.broker_url = self.app.app.conf.result_backend = bench.server.url
        self.peer_python = peers.python()
        slots = str(self.app.INTAKE_SLOTS)
        self.peers = [peers.taskiq(self.app.INTAKE_SLOTS), peers.arq()]
        self.peer_env = {"ARQ_MAX_JOBS": slots}
        plain = ("-P", "threads", "-c", str(PLAIN_CONCURRENCY), "-Q", self.app.INTAKE_PLAIN_QUEUE)
        self.celery_args = {
            "ours": ("--concurrent-function", f"{APP}.intake_ours", *QUIET),
            "plain": (*plain, "--without-concurrent", *QUIET),
        }
        self.commands = {
            name: f"celery -A {APP} worker " + " ".join(args)
            for name, args in self.celery_args.items()
        }
        if self.peers_ready:
            self.commands.update({p.name: p.command for p in self.peers})
        else:
            print(f"peers skipped: {self.peer_python}", flush=True)
        self.procs: dict[str, Any] = {}

    @property
    def peers_ready(self) -> bool:
        return isinstance(self.peer_python, Path)

    def names(self, kind: str) -> list[str]:
        if kind == "intake, results ignored":
            return ["ours", "plain"]
        celery = ["ours", "plain"] if kind == "intake" else ["ours"]
        return [*celery, *(p.name for p in self.peers if self.peers_ready)]

    def start(self, name: str) -> None:
        if name in self.celery_args:
            self.procs[name] = self.bench.workers.start(
                APP, *self.celery_args[name], wait_ready=False
            )
            return
        peer = self._peer(name)
        log = self.bench.logdir / f"{name}.log"
        assert isinstance(self.peer_python, Path)
        self.procs[name] = peer.start(self.peer_python, self.bench.server.url, log, self.peer_env)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if name in self.celery_args:
            self.bench.workers.stop(proc)
        else:
            stop_processes([proc])

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def _peer(self, name: str) -> peers.Peer:
        return next(p for p in self.peers if p.name == name)

    def publish(
        self, name: str, key: str, total: int, seconds: float, ignore_result: bool = False
    ) -> None:
        if name in self.celery_args:
            task = f"{APP}.intake_ours" if name == "ours" else f"{APP}.intake_plain"
            options = {"ignore_result": True} if ignore_result else {}
            publish(self.app.app, task, (key, total, seconds), total, **options)
            return
        assert isinstance(self.peer_python, Path)
        self._peer(name).publish(self.peer_python, self.bench.server.url, key, total, seconds, True)

    def check(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            log = self.bench.logdir / f"{name}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{name}'s worker exited ({proc.returncode}):\n{tail}")


def intake_run(sides: Sides, name: str, round_no: int, args: Any, kind: str = "intake") -> Run:
    key = f"bench:{kind}:{name}:{round_no}"
    stamps.reset(sides.bench.rds, key)
    began = time.time()
    sides.publish(name, key, args.inputs, 0.0, ignore_result=kind != "intake")
    published = time.time()
    sides.start(name)
    try:
        stamps.wait_done(sides.bench.rds, key, args.inputs, args.timeout, lambda: sides.check(name))
    finally:
        sides.stop(name)
    starts = sorted(start for start, _ in stamps.read(sides.bench.rds, key))
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    return Run(name, kind, round_no, rate, published - began)


def live_run(sides: Sides, name: str, round_no: int, args: Any) -> Run:
    key = f"bench:intake:live:{name}:{round_no}"
    stamps.reset(sides.bench.rds, key)
    began = time.time()
    sides.publish(name, key, args.inputs, 1.0)
    published = time.time()
    stamps.wait_done(sides.bench.rds, key, args.inputs, args.timeout, lambda: sides.check(name))
    last_end = max(end for _, end in stamps.read(sides.bench.rds, key))
    return Run(name, "live", round_no, last_end - published, published - began)


def warm(sides: Sides, name: str, timeout: float) -> None:
    key = f"bench:intake:warm:{name}"
    stamps.reset(sides.bench.rds, key)
    sides.publish(name, key, 50, 0.0)
    stamps.wait_done(sides.bench.rds, key, 50, timeout, lambda: sides.check(name))


def results_of(runs: list[Run], sides: Sides) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in (*INTAKE_KINDS, "live"):
        values = {
            name: spread([r.value for r in runs if r.side == name and r.kind == kind])
            for name in sides.names(kind)
        }
        ours = values["ours"]["median"]
        ratios = {
            f"ours_over_{name}" if kind != "live" else f"{name}_over_ours": (
                ours / v["median"] if kind != "live" else v["median"] / ours
            )
            for name, v in values.items()
            if name != "ours"
        }
        results[kind] = {**values, **ratios}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = options("intake", __doc__)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, each kind")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    bench = Bench("intake", parser, argv)
    args = bench.args
    runs: list[Run] = []
    with bench:
        sides = Sides(bench, args.inputs)
        try:
            for kind in INTAKE_KINDS:
                for round_no, name in rotations(sides.names(kind), args.rounds):
                    run = intake_run(sides, name, round_no, args, kind)
                    runs.append(run)
                    print(f"{kind} round {round_no + 1} {name:7}: {run.value:7.0f}/s", flush=True)
            for name in sides.names("live"):
                sides.start(name)
                warm(sides, name, args.timeout)
                for round_no in range(args.rounds):
                    run = live_run(sides, name, round_no, args)
                    runs.append(run)
                    print(
                        f"live round {round_no + 1} {name:7}: {run.value:5.2f} s after the last "
                        f"publish (publishing took {run.publish_s:.2f} s)",
                        flush=True,
                    )
                sides.stop(name)
        finally:
            sides.stop_all()
    results = results_of(runs, sides)
    print()
    units = [(kind, "inputs/s") for kind in INTAKE_KINDS] + [("live", "s after the last publish")]
    for kind, unit in units:
        line = ", ".join(
            f"{name} {results[kind][name]['median']:.2f}" for name in sides.names(kind)
        )
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in results[kind].items() if "_over_" in k)
        print(f"{kind} ({unit}): {line}; {ratios}")
    parameters = {
        "inputs": args.inputs,
        "rounds": args.rounds,
        "peers": list(peers.REQUIREMENTS),
        "intake": "(K - 1) / (last start - first start), K no-ops queued before the worker "
        "starts, results stored",
        "live": "K x asyncio.sleep(1) published in a loop to a warm worker: last publish to "
        "last end",
    }
    bench.write(parameters, sides.commands, results, runs=[asdict(run) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
