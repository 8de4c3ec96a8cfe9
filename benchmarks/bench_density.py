"""Scenario 4, async density: 10,000 inputs of ``asyncio.sleep(1)`` in one container.

Run it with ``python -m benchmarks.bench_density`` from the repository root.

Sides, each a worker already running (and warmed up) when its run begins:

- **ours**: a node, ``celery -A benchmarks.apps worker -c 1 --concurrent-functions
  benchmarks.apps.density_ours``, whose ``keep_warm`` container runs the async
  function with ``max_inputs=10000``: 10,000 asyncio tasks on one event-loop thread.
- **threads + asyncio.run**: ``celery worker -P threads -c 1000`` running the same
  coroutine the way Celery users run one today (as celery-aio-pool and dramatiq's
  asyncio support do): each input blocks a pool thread on an event loop,
  ``asyncio.run(asyncio.sleep(1))``.
- **floor**: ``celery worker -P threads -c 10`` taking in 10,000 no-op inputs. No
  worker that receives its inputs one message at a time from Redis can be faster, so
  ``floor + 1 s`` bounds the density run from below on this machine.

How one run is measured: the benchmark publishes the inputs itself, live, as a client
would (``apply_async`` in a loop on one producer). Each input notes when it started and
finished, and its worker adds them up in Redis every 500 inputs and at the last one
(:func:`benchmarks.apps.record`), so the measurement costs no Redis call per input on the
loop it measures. The report gives, per run:

- ``wall_s``: from the first input starting to the last finishing: the figure the target
  (<= 3 s) is about;
- ``from_publish_s``: from the first publish to the last finish, which also counts the
  publisher's loop;
- ``publish_s``: how long publishing took (10,000 messages take seconds of their own);
- the worker process's most threads and most resident memory (``/proc``, every 50 ms).

The **pre-loaded** rows (ours, and the floor) instead put all inputs in the queue at
one instant (a Redis ``COPY`` of a list published before), so no publisher competes for
the two CPUs while they run: their ``wall_s`` is the worker's intake alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import (
    ProcessSampler,
    publish,
    reset_tally,
    spread,
    wait_for_tally,
    wait_until,
)
from benchmarks.scenario import APP, Bench, options, run_main, worker_command
from devkit.bursts import burst, publish_template
from devkit.processes import containers_of

OURS = f"{APP}.density_ours"
BLOCKING = f"{APP}.density_blocking"
NOOP = f"{APP}.density_noop"
TARGET_WALL_S = 3.0
TARGET_THREADS = 20
TARGET_RSS_MB = 300.0
QUIET = ("-l", "WARNING", "--without-gossip", "--without-mingle")
WARM_UP_INPUTS = 200


@dataclass(frozen=True)
class Side:
    name: str
    task: str
    queue: str
    #: which worker process runs it (two sides share the node)
    worker: str
    preloaded: bool
    seconds: float

    @property
    def key(self) -> str:
        return f"bench:density:{self.name}"

    @property
    def template(self) -> str:
        return f"bench:density:template:{self.name}"


@dataclass(frozen=True)
class Run:
    side: str
    round: int
    wall_s: float
    from_publish_s: float
    publish_s: float
    max_threads: int
    max_rss_mb: float
    load_1m: float


def worker_args(bench: Bench) -> dict[str, tuple[str, ...]]:
    """The three workers: the node (ours, twice), and two plain ones."""
    queue = bench.apps.DENSITY_QUEUE
    plain = ("--without-concurrent", *QUIET)
    return {
        "node": ("-c", "1", "--concurrent-functions", OURS, *QUIET),
        "threads": ("-P", "threads", "-c", "1000", "-Q", queue, *plain),
        "floor": ("-P", "threads", "-c", "10", "-Q", f"{queue}.floor", *plain),
    }


def sides(bench: Bench) -> list[Side]:
    spec = bench.spec(OURS)
    queue = bench.apps.DENSITY_QUEUE
    return [
        Side("ours", OURS, spec.queue, "node", preloaded=False, seconds=1.0),
        Side("ours, pre-loaded", OURS, spec.queue, "node", preloaded=True, seconds=1.0),
        Side("threads + asyncio.run", BLOCKING, queue, "threads", preloaded=False, seconds=1.0),
        Side("floor: no-op intake", NOOP, f"{queue}.floor", "floor", preloaded=True, seconds=0.0),
    ]


def measured_pid(side: Side, proc: Any, timeout: float) -> int:
    """The process that runs the side's inputs: the node's container, or the worker."""
    if side.worker != "node":
        return int(proc.pid)
    wait_until(lambda: containers_of(proc.pid), timeout, "ours: the container", proc)
    return int(containers_of(proc.pid)[0].pid)


def measure(bench: Bench, side: Side, proc: Any, total: int, round_no: int, timeout: float) -> Run:
    rds = bench.rds
    reset_tally(rds, side.key)
    with ProcessSampler(measured_pid(side, proc, timeout)) as sampler:
        if side.preloaded:
            began = published = burst(rds, side.template, side.queue)
        else:
            began = time.time()
            publish(bench.app, side.task, (side.key, total, side.seconds), total, side.queue)
            published = time.time()
        try:
            tally = wait_for_tally(rds, side.key, total, timeout, alive=proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{side.name}: {exc}\n{bench.workers.tail(proc)}") from exc
    return Run(
        side.name,
        round_no,
        tally.last_finish - tally.first_start,
        tally.last_finish - began,
        published - began,
        sampler.max_threads,
        sampler.max_rss / 2**20,
        os.getloadavg()[0],
    )


def warm_up(bench: Bench, side: Side, proc: Any, timeout: float) -> None:
    """A few short inputs, so that a run never waits for a worker to start."""
    key = f"{side.key}:warm-up"
    reset_tally(bench.rds, key)
    args = (key, WARM_UP_INPUTS, min(side.seconds, 0.01))
    publish(bench.app, side.task, args, WARM_UP_INPUTS, side.queue)
    wait_for_tally(bench.rds, key, WARM_UP_INPUTS, timeout, alive=proc)


def summarize(runs: list[Run], name: str) -> dict[str, Any]:
    mine = [run for run in runs if run.side == name]
    return {
        "wall_s": spread([run.wall_s for run in mine]),
        "from_publish_s": spread([run.from_publish_s for run in mine]),
        "publish_s": spread([run.publish_s for run in mine]),
        "max_threads": max(run.max_threads for run in mine),
        "max_rss_mb": max(run.max_rss_mb for run in mine),
        "runs": len(mine),
    }


def run_rounds(
    bench: Bench, all_sides: list[Side], args_of: dict[str, tuple[str, ...]], args: Any
) -> list[Run]:
    """Ours live, then each other side (slower, or there to explain)."""
    for side in all_sides:
        if side.preloaded:
            arguments = (side.key, args.inputs, side.seconds)
            publish_template(bench.app, bench.rds, side.task, arguments, args.inputs, side.template)
    procs = {name: bench.start(*worker) for name, worker in args_of.items()}
    for name, proc in procs.items():
        warm_up(bench, next(s for s in all_sides if s.worker == name), proc, args.timeout)
    schedule = [(n, all_sides[0]) for n in range(args.rounds)]
    schedule += [(n, s) for s in all_sides[1:] for n in range(args.compare_rounds)]
    runs: list[Run] = []
    for round_no, side in schedule:
        run = measure(bench, side, procs[side.worker], args.inputs, round_no, args.timeout)
        runs.append(run)
        print(
            f"round {round_no + 1} {side.name:22}: wall {run.wall_s:6.2f} s, from "
            f"publish {run.from_publish_s:6.2f} s (publish {run.publish_s:.2f} s), "
            f"{run.max_threads} threads, {run.max_rss_mb:.0f} MB "
            f"(load {run.load_1m:.2f})",
            flush=True,
        )
    return runs


def results_of(runs: list[Run], all_sides: list[Side]) -> dict[str, Any]:
    results = {side.name: summarize(runs, side.name) for side in all_sides}
    ours = results["ours"]
    meets = {
        "wall": ours["wall_s"]["median"] <= TARGET_WALL_S,
        "threads": ours["max_threads"] <= TARGET_THREADS,
        "rss": ours["max_rss_mb"] <= TARGET_RSS_MB,
    }
    return {
        **results,
        "targets": {"wall_s": TARGET_WALL_S, "threads": TARGET_THREADS, "rss_mb": TARGET_RSS_MB},
        "meets_targets": meets,
        "floor_plus_sleep_s": results["floor: no-op intake"]["wall_s"]["median"] + 1.0,
    }


def print_summary(all_sides: list[Side], results: dict[str, Any], inputs: int) -> None:
    print()
    print(
        f"{'side':22} {'wall s':>7} {'min':>6} {'max':>6} {'publish+':>9} {'publish':>8} "
        f"{'threads':>8} {'RSS MB':>7}"
    )
    for side in all_sides:
        numbers = results[side.name]
        wall, from_publish = numbers["wall_s"], numbers["from_publish_s"]
        print(
            f"{side.name:22} {wall['median']:7.2f} {wall['min']:6.2f} {wall['max']:6.2f} "
            f"{from_publish['median']:9.2f} {numbers['publish_s']['median']:8.2f} "
            f"{numbers['max_threads']:8} {numbers['max_rss_mb']:7.0f}"
        )
    ours, meets = results["ours"], results["meets_targets"]
    print(
        f"ours: wall {ours['wall_s']['median']:.2f} s (target <= {TARGET_WALL_S:g}: "
        f"{'meets' if meets['wall'] else 'misses'}), {ours['max_threads']} threads (<= "
        f"{TARGET_THREADS}: {'meets' if meets['threads'] else 'misses'}), "
        f"{ours['max_rss_mb']:.0f} MB (<= {TARGET_RSS_MB:g}: "
        f"{'meets' if meets['rss'] else 'misses'})"
    )
    floor = results["floor: no-op intake"]["wall_s"]["median"]
    print(f"floor: {inputs} no-op inputs take {floor:.2f} s to go through a plain worker")


def parameters(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    return {
        "inputs": args.inputs,
        "rounds_ours": args.rounds,
        "rounds_each_other_side": args.compare_rounds,
        "ours_function": spec.as_dict(),
        "wall": "first input start to last input finish",
        "from_publish": "first publish (or the pre-loaded burst) to last input finish",
        "publish": "apply_async of every input, in a loop on one producer",
        "threads_and_rss": "the most seen in the process that runs the inputs (the "
        "container for ours), sampled every 50 ms from /proc",
    }


def main(argv: list[str] | None = None) -> int:
    parser = options("density", __doc__)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of ours (published live)")
    parser.add_argument(
        "--compare-rounds", type=int, default=2, help="runs of each other side, at the end"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    bench = Bench("density", parser, argv)
    args = bench.args
    with bench:
        spec = bench.spec(OURS)
        assert spec.max_inputs >= args.inputs, spec
        all_sides, args_of = sides(bench), worker_args(bench)
        runs = run_rounds(bench, all_sides, args_of, args)
    results = results_of(runs, all_sides)
    print_summary(all_sides, results, args.inputs)
    workers = {side.name: worker_command(args_of[side.worker]) for side in all_sides}
    bench.write(parameters(args, spec), workers, results, runs=[asdict(run) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
