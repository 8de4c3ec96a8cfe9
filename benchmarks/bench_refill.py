"""Refill: how soon a freed slot runs its next input, against plain Celery and the peers.

Run it with ``python -m benchmarks.bench_refill`` from the repository root.

The work is the published peer benchmark's: 1,000 inputs of ``time.sleep(0.1)`` on 10
slots, so the ceiling is 100 inputs/s. Each run publishes the inputs live (a client
calling ``apply_async`` in a loop, or the peer's own ``kiq``/``enqueue_job``) to a
worker that is already running and warm, and results are stored in a Redis result
backend on every side. Sides, in turns within each round:

- **ours**: one warm container of ``@concurrent(max_inputs=10)``
  (``benchmarks.refill_app.refill_ours``), which holds no message beyond its free slots;
- **plain**: Celery's ``-P threads -c 10`` with its default prefetch (40 messages);
- **taskiq**: Taskiq's worker on its Redis list broker, 10 tasks at once on 10 threads;
- **arq**: arq, ``max_jobs=10``, the sleep on the loop's executor (10 threads), with its
  default ``poll_delay`` of 0.5 s.

Each input stamps its start and end in its own process (:mod:`benchmarks.stamps`). The
figures per run: inputs/s from the first start to the last end, and the **refill gap**
of each slot, from an input ending to the next input starting in its place (the k-th
end frees the slot that the (k + 10)-th start takes), p50 and p90, while the queue
holds a backlog. The report gives the medians over the rounds, ours/plain and
ours/peer, and ours against the ceiling. It writes ``benchmarks/results/refill.json``.
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
WARM_UP_INPUTS = 30


@dataclass(frozen=True)
class Run:
    side: str
    round: int
    inputs_per_s: float
    gap_ms_p50: float | None
    gap_ms_p90: float | None
    wall_s: float
    publish_s: float


class Sides:
    """The workers of every side, started once and kept warm through the rounds."""

    def __init__(self, bench: Bench, slots: int) -> None:
        self.bench = bench
        self.app: Any = importlib.import_module(APP)
        self.app.app.conf.broker_url = self.app.app.conf.result_backend = bench.server.url
        self.procs: dict[str, Any] = {}
        self.commands: dict[str, str] = {}
        self.peer_python = peers.python()
        self.peers = [peers.taskiq(slots), peers.arq()]
        ours = f"{APP}.refill_ours"
        plain = ("-P", "threads", "-c", str(slots), "-Q", self.app.PLAIN_QUEUE)
        self.celery_args = {
            "ours": ("--concurrent-function", ours, *QUIET),
            "plain": (*plain, "--without-concurrent", *QUIET),
        }

    @property
    def names(self) -> list[str]:
        return [*self.celery_args, *(p.name for p in self.peers if self.peers_ready)]

    @property
    def peers_ready(self) -> bool:
        return isinstance(self.peer_python, Path)

    def start(self) -> None:
        for name, args in self.celery_args.items():
            self.procs[name] = self.bench.workers.start(APP, *args, wait_ready=False)
            self.commands[name] = "celery -A " + APP + " worker " + " ".join(args)
        if not self.peers_ready:
            print(f"peers skipped: {self.peer_python}", flush=True)
            return
        for peer in self.peers:
            log = self.bench.logdir / f"{peer.name}.log"
            assert isinstance(self.peer_python, Path)
            self.procs[peer.name] = peer.start(self.peer_python, self.bench.server.url, log)
            self.commands[peer.name] = peer.command

    def stop(self) -> None:
        peer_procs = [self.procs[p.name] for p in self.peers if p.name in self.procs]
        stop_processes(peer_procs)

    def publish(self, name: str, key: str, total: int, seconds: float) -> None:
        if name in self.celery_args:
            task = f"{APP}.refill_ours" if name == "ours" else f"{APP}.refill_plain"
            publish(self.app.app, task, (key, total, seconds), total)
            return
        peer = next(p for p in self.peers if p.name == name)
        assert isinstance(self.peer_python, Path)
        peer.publish(self.peer_python, self.bench.server.url, key, total, seconds, False)

    def alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name}'s worker exited ({proc.returncode})")


def wait_done(sides: Sides, name: str, key: str, total: int, timeout: float) -> None:
    stamps.wait_done(sides.bench.rds, key, total, timeout, lambda: sides.alive(name))


def measure(sides: Sides, name: str, round_no: int, args: Any) -> Run:
    key = f"bench:refill:{name}:{round_no}"
    stamps.reset(sides.bench.rds, key)
    began = time.time()
    sides.publish(name, key, args.inputs, args.seconds)
    published = time.time()
    wait_done(sides, name, key, args.inputs, args.timeout)
    pairs = stamps.read(sides.bench.rds, key)
    # The queue holds a backlog from the first inputs on: publishing outruns 100/s.
    figures = stamps.figures(pairs, args.slots, backlog_from=began + 2 * args.seconds)
    return Run(
        name,
        round_no,
        figures["inputs_per_s"],
        figures["gap_ms_p50"],
        figures["gap_ms_p90"],
        figures["wall_s"],
        published - began,
    )


def summarize(runs: list[Run], name: str) -> dict[str, Any]:
    mine = [run for run in runs if run.side == name]
    return {
        "inputs_per_s": spread([run.inputs_per_s for run in mine]),
        "gap_ms_p50": spread([run.gap_ms_p50 for run in mine if run.gap_ms_p50 is not None]),
        "gap_ms_p90": spread([run.gap_ms_p90 for run in mine if run.gap_ms_p90 is not None]),
        "publish_s": spread([run.publish_s for run in mine]),
    }


def results_of(runs: list[Run], names: list[str], ceiling: float) -> dict[str, Any]:
    results: dict[str, Any] = {name: summarize(runs, name) for name in names}
    ours = results["ours"]["inputs_per_s"]["median"]
    for name in names[1:]:
        results[f"ours_over_{name}"] = ours / results[name]["inputs_per_s"]["median"]
    per_round: dict[int, dict[str, float]] = {}
    for run in runs:
        per_round.setdefault(run.round, {})[run.side] = run.inputs_per_s
    results["per_round_ours_over_plain"] = spread(
        [pair["ours"] / pair["plain"] for pair in per_round.values() if "plain" in pair]
    )
    results["ceiling_inputs_per_s"] = ceiling
    results["ours_over_ceiling"] = ours / ceiling
    return results


def print_summary(results: dict[str, Any], names: list[str]) -> None:
    print()
    print(f"{'side':7} {'inputs/s':>9} {'min':>7} {'max':>7} {'gap p50 ms':>11} {'p90 ms':>8}")
    for name in names:
        rate, p50, p90 = (results[name][k] for k in ("inputs_per_s", "gap_ms_p50", "gap_ms_p90"))
        print(
            f"{name:7} {rate['median']:9.1f} {rate['min']:7.1f} {rate['max']:7.1f} "
            f"{p50['median']:11.2f} {p90['median']:8.2f}"
        )
    ratios = ", ".join(f"ours/{name} {results[f'ours_over_{name}']:.3f}" for name in names[1:])
    print(f"{ratios}; ours/ceiling {results['ours_over_ceiling']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = options("refill", __doc__)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=0.1, help="each input's sleep")
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    bench = Bench("refill", parser, argv)
    args = bench.args
    runs: list[Run] = []
    with bench:
        sides = Sides(bench, args.slots)
        try:
            sides.start()
            for name in sides.names:  # warm: started, connected, threads made
                key = f"bench:refill:{name}:warm-up"
                sides.publish(name, key, WARM_UP_INPUTS, 0.0)
                wait_done(sides, name, key, WARM_UP_INPUTS, args.timeout)
            for round_no, name in rotations(sides.names, args.rounds):
                run = measure(sides, name, round_no, args)
                runs.append(run)
                print(
                    f"round {round_no + 1} {name:7}: {run.inputs_per_s:6.1f} inputs/s, gap "
                    f"p50 {run.gap_ms_p50 or 0:.2f} ms p90 {run.gap_ms_p90 or 0:.2f} ms "
                    f"(publish {run.publish_s:.2f} s)",
                    flush=True,
                )
        finally:
            sides.stop()
        names, commands = sides.names, sides.commands
    results = results_of(runs, names, args.slots / args.seconds)
    print_summary(results, names)
    parameters = {
        "inputs": args.inputs,
        "seconds": args.seconds,
        "slots": args.slots,
        "rounds": args.rounds,
        "peers": list(peers.REQUIREMENTS),
        "throughput": "inputs / (last end - first start), published live, results stored",
        "gap": "end of the k-th input to the (k + slots)-th start, while a backlog waits",
    }
    bench.write(parameters, commands, results, runs=[asdict(run) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
