"""Scenario 1, an I/O-bound burst: ours from zero containers, and plain Celery, side by side.

Run it with ``python -m benchmarks.bench_burst`` from the repository root.

The work: 2,000 inputs of ``time.sleep(0.5)``, all in the queue at one instant (a Redis
``COPY`` of a list published beforehand, so publishing is not part of the run). Each
input stamps when it started and finished (:func:`benchmarks.apps.record`), and the
run ends with the last finish. Sides:

- **ours**: a node, ``celery -A benchmarks.apps worker -c 1 --concurrent-functions
  benchmarks.apps.burst_ours``, with no container when the burst arrives; the
  function has ``max_inputs=100``, ``max_containers=4``, ``min_containers=0`` and
  ``scaledown_window=1`` (so that each run starts cold again soon). The clock runs
  from the burst, so it includes the supervisor seeing the backlog, the forks and
  every container's start.
- **threads**: ``celery worker -P threads -c 400``, already running.
- **gevent**: ``celery worker -P gevent -c 400``, already running.
- **prefork**: ``celery worker -P prefork -c 2``, already running. Two processes take
  1,000 rounds of 0.5 s, about 500 s; it runs ``--prefork-inputs`` inputs (40 by
  default) and its wall time for 2,000 is extrapolated from its rate,
  ``2000 / (k / wall_k)``. ``--prefork-inputs 2000`` measures it whole.

The plain workers use Celery's defaults (prefetch multiplier 4) and run without the
node supervisor (``--without-concurrent``).

Efficiency, the target (>= 0.9), is ``ideal / wall`` for ours, where ``ideal =
ceil(inputs / (max_inputs x max_containers)) x 0.5 s + cold start``: five rounds of
400 inputs, plus one cold start measured in the same run, from the burst to the first
input starting. The plain pools get the same ratio with their own slots (their first
input starts within milliseconds), for reference. For ours it also gives how long after
the burst all ``max_containers`` containers were started (their processes, read from
``/proc`` every 5 ms), and that as a share of one input's 0.5 s: below 1, the scale-up
was complete before the first input finished. Each side's figure is the median of
its runs (rounds rotate which side goes first; a warm-up round is not counted), with the
min and max; "speed-up" is a side's median wall over ours.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import (
    JITTER_SECONDS,
    FirstMoment,
    reset_tally,
    spread,
    wait_for_tally,
    wait_until,
)
from benchmarks.scenario import APP, Bench, options, rotations, run_main, worker_command
from devkit.bursts import burst, publish_template
from devkit.processes import containers_of

OURS = f"{APP}.burst_ours"
PLAIN = f"{APP}.burst_plain"
TARGET_EFFICIENCY = 0.9
QUIET = ("-l", "WARNING", "--without-gossip", "--without-mingle")


@dataclass(frozen=True)
class Side:
    name: str
    task: str
    queue: str
    worker_args: tuple[str, ...]
    inputs: int
    #: inputs it runs at once: max_inputs x max_containers, or the pool's concurrency
    slots: int
    #: containers it scales to (ours), or none (a plain worker is there already)
    containers: int = 0

    @property
    def command(self) -> str:
        return worker_command(self.worker_args)

    @property
    def template(self) -> str:
        return f"bench:burst:template:{self.name}"

    @property
    def key(self) -> str:
        return f"bench:burst:{self.name}"


@dataclass(frozen=True)
class Run:
    side: str
    round: int
    inputs: int
    wall_s: float
    #: from the burst to the first input starting
    first_start_s: float
    load_1m: float
    #: from the burst to the last of the side's containers forked (ours), if it got there
    full_scale_s: float | None = None


def sides(bench: Bench, inputs: int, prefork_inputs: int) -> list[Side]:
    spec = bench.spec(OURS)
    assert spec.max_containers is not None
    args = ("-c", "1", "--concurrent-functions", OURS, *QUIET)
    slots = spec.max_inputs * spec.max_containers
    ours = Side("ours", OURS, spec.queue, args, inputs, slots, spec.max_containers)
    plain = [("threads", 400, inputs), ("gevent", 400, inputs), ("prefork", 2, prefork_inputs)]
    return [ours] + [plain_side(bench, name, c, n) for name, c, n in plain]


def plain_side(bench: Bench, pool: str, concurrency: int, inputs: int) -> Side:
    """A plain worker of the pool; each has a queue of its own, as they all run at once."""
    queue = f"{bench.apps.BURST_QUEUE}.{pool}"
    args = ("-P", pool, "-c", str(concurrency), "-Q", queue, "--without-concurrent", *QUIET)
    return Side(pool, PLAIN, queue, args, inputs, concurrency)


def schedule(sides: list[Side], rounds: int, prefork_rounds: int) -> list[tuple[int, Side]]:
    """Round -1 warms every side up (thread pools, gevent, the fork server) and is not
    counted; prefork, slow, runs last."""
    rotating = [side for side in sides if side.name != "prefork"]
    prefork = [side for side in sides if side.name == "prefork"]
    return rotations(rotating, rounds, warm_up=True) + rotations(prefork, prefork_rounds)


def measure(
    bench: Bench, side: Side, proc: Any, round_no: int, pause: float, timeout: float
) -> Run:
    rds = bench.rds
    if side.name == "ours":
        # Each burst finds no container: the last run's have retired (scaledown_window 1 s).
        wait_until(lambda: not containers_of(proc.pid), timeout, "ours: cold", proc)
    time.sleep(pause)  # a burst lands anywhere in the supervisor's poll, as a real one does
    reset_tally(rds, side.key)
    # Ours: when its last container process is there (forked), read from /proc; the
    # plain workers get no watcher, which would only take CPU from them.
    full = FirstMoment(lambda: len(containers_of(proc.pid)) >= side.containers)
    with full if side.containers else contextlib.nullcontext():
        began = burst(rds, side.template, side.queue)
        try:
            tally = wait_for_tally(rds, side.key, side.inputs, timeout, alive=proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{side.name}: {exc}\n{bench.workers.tail(proc)}") from exc
    return Run(
        side.name,
        round_no,
        side.inputs,
        tally.last_finish - began,
        tally.first_start - began,
        os.getloadavg()[0],
        None if full.at is None else full.at - began,
    )


def run_rounds(bench: Bench, all_sides: list[Side], args: argparse.Namespace) -> list[Run]:
    for side in all_sides:
        arguments = (side.key, side.inputs, args.seconds)
        publish_template(bench.app, bench.rds, side.task, arguments, side.inputs, side.template)
    procs = {side.name: bench.start(*side.worker_args) for side in all_sides}
    jitter = random.Random(args.seed)
    runs: list[Run] = []
    for round_no, side in schedule(all_sides, args.rounds, args.prefork_rounds):
        pause = jitter.uniform(0, JITTER_SECONDS)
        run = measure(bench, side, procs[side.name], round_no, pause, args.timeout)
        if round_no < 0:
            continue
        runs.append(run)
        print(
            f"round {round_no + 1} {side.name:8} {run.inputs:5} inputs: wall "
            f"{run.wall_s:6.2f} s, first input after {run.first_start_s:.3f} s "
            f"(load {run.load_1m:.2f})",
            flush=True,
        )
    return runs


def ideal_seconds(inputs: int, slots: int, seconds: float, cold_start: float) -> float:
    return math.ceil(inputs / slots) * seconds + cold_start


def summarize(runs: list[Run], side: Side, inputs: int, seconds: float) -> dict[str, Any]:
    mine = [run for run in runs if run.side == side.name]
    # prefork runs fewer inputs: its wall time for ``inputs`` comes from its rate
    walls = [run.wall_s * inputs / run.inputs for run in mine]
    numbers: dict[str, Any] = {
        "wall_s": spread(walls),
        "first_start_s": spread([run.first_start_s for run in mine]),
        "runs": len(mine),
        "inputs_per_run": side.inputs,
        "extrapolated": side.inputs != inputs,
    }
    ideals = [ideal_seconds(run.inputs, side.slots, seconds, run.first_start_s) for run in mine]
    numbers["ideal_s"] = spread(ideals)
    numbers["efficiency"] = spread([i / run.wall_s for i, run in zip(ideals, mine, strict=True)])
    if side.containers:
        full = [run.full_scale_s for run in mine if run.full_scale_s is not None]
        numbers["full_scale_s"] = spread(full) if full else None
        numbers["full_scale_runs"] = f"{len(full)} of {len(mine)}"
        # within the first input's time: the scale-up came before the backlog was served
        numbers["full_scale_per_input_time"] = (
            numbers["full_scale_s"]["median"] / seconds if full else None
        )
    return numbers


def results_of(runs: list[Run], all_sides: list[Side], args: argparse.Namespace) -> dict[str, Any]:
    results = {side.name: summarize(runs, side, args.inputs, args.seconds) for side in all_sides}
    ours = results["ours"]
    for numbers in results.values():
        numbers["speedup_of_ours"] = numbers["wall_s"]["median"] / ours["wall_s"]["median"]
    return results


def print_summary(all_sides: list[Side], results: dict[str, Any], seconds: float) -> None:
    print()
    header = f"{'side':8} {'wall s':>8} {'min':>7} {'max':>7} {'speed-up':>9} {'efficiency':>11}"
    print(f"{header}  command")
    for side in all_sides:
        numbers = results[side.name]
        wall = numbers["wall_s"]
        note = f" (extrapolated from {side.inputs} inputs)" if numbers["extrapolated"] else ""
        print(
            f"{side.name:8} {wall['median']:8.2f} {wall['min']:7.2f} {wall['max']:7.2f} "
            f"{numbers['speedup_of_ours']:8.2f}x {numbers['efficiency']['median']:11.3f}  "
            f"{side.command}{note}"
        )
    ours = results["ours"]
    efficiency = ours["efficiency"]
    verdict = "meets" if efficiency["median"] >= TARGET_EFFICIENCY else "misses"
    print(
        f"ours: efficiency {efficiency['median']:.3f} (min {efficiency['min']:.3f}, max "
        f"{efficiency['max']:.3f}; {verdict} the target {TARGET_EFFICIENCY}), ideal "
        f"{ours['ideal_s']['median']:.2f} s with a cold start of "
        f"{ours['first_start_s']['median']:.3f} s"
    )
    full = ours["full_scale_s"]
    if full is not None:
        print(
            f"ours: all {all_sides[0].containers} containers forked {full['median']:.3f} s "
            f"after the burst (min {full['min']:.3f}, max {full['max']:.3f}; "
            f"{ours['full_scale_runs']} runs), {ours['full_scale_per_input_time']:.2f} of one "
            f"input's {seconds:g} s"
        )


def parameters(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    return {
        "inputs": args.inputs,
        "seconds_per_input": args.seconds,
        "rounds_per_side": args.rounds,
        "prefork_inputs": args.prefork_inputs,
        "prefork_rounds": args.prefork_rounds,
        "ours_function": spec.as_dict(),
        "burst": "all inputs put in the queue at once (Redis COPY of a published list)",
        "wall": "from the burst to the last input finishing",
        "ideal": "ceil(inputs / (max_inputs x max_containers)) x seconds + the run's "
        "cold start (burst to first input start)",
        "prefork_wall": "inputs / (prefork_inputs / measured wall), when fewer inputs ran",
        "full_scale": "from the burst to max_containers container processes of ours "
        "(the fork server's children, read every 5 ms); per input time: that over "
        "seconds_per_input",
    }


def main(argv: list[str] | None = None) -> int:
    parser = options("burst", __doc__)
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.5, help="each input's sleep")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each side")
    parser.add_argument("--prefork-inputs", type=int, default=40)
    parser.add_argument("--prefork-rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    parser.add_argument("--seed", type=int, default=0, help="of the pauses before bursts")
    bench = Bench("burst", parser, argv)
    args = bench.args
    with bench:
        spec = bench.spec(OURS)
        all_sides = sides(bench, args.inputs, args.prefork_inputs)
        runs = run_rounds(bench, all_sides, args)
    results = results_of(runs, all_sides, args)
    print_summary(all_sides, results, args.seconds)
    efficiency = results["ours"]["efficiency"]["median"]
    results |= {
        "efficiency": efficiency,
        "target_efficiency": TARGET_EFFICIENCY,
        "meets_target": efficiency >= TARGET_EFFICIENCY,
    }
    workers = {side.name: side.command for side in all_sides}
    bench.write(parameters(args, spec), workers, results, runs=[asdict(run) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
