"""Overhead of a container against plain Celery, on the same no-op work.

Run it with ``python -m benchmarks.bench_overhead`` from the repository root.

Two workers take turns on one private Redis; only one runs at a time:

- **ours**: one container, ``celery -A benchmarks.apps worker --concurrent-function
  benchmarks.apps.concurrent_noop`` (10 threads, never more than 10 messages reserved);
- **plain**: ``celery -A benchmarks.apps worker -P threads -c 10 -Q bench.plain`` running
  ``plain_noop`` with Celery's default prefetch multiplier (4, so 40 reserved).

How one run is measured, the same way on both sides:

1. With no worker running, the queue is filled with the same ``K`` messages (published
   once per side, then copied back in with Redis ``COPY`` before each run).
2. The worker starts and drains the backlog. Each input does the task's only work: an
   ``INCR`` of a counter in Redis; the input that makes it 1 and the one that makes it
   ``K`` store ``time.time()``.
3. Throughput is ``(K - 1) / (t_K - t_1)``: from the first completion to the last. Worker
   start-up (imports, connecting, the first fetch) is left out; it is reported on its
   own as ``startup_s`` (from spawning the process to the first completion).
4. The worker's CPU time (user + system, all its threads, from ``/proc``) between the
   first poll that sees a completion and the last completion, per input. Other load on
   the machine slows a worker's wall clock but hardly its CPU cost per input, so this
   second figure is the steadier measure of overhead on a shared machine.

Rounds alternate which side goes first (ours-plain, plain-ours, ...), so a drift of the
machine weighs on both sides alike. The report gives, per side, the median and the spread
(min/max) of throughput and of CPU per input; the ratio of the median throughputs
ours/plain (the headline number, target >= 0.95), the median of the per-round ratios as
a check against drift, and the CPU ratio plain/ours (>= 1 means ours costs no more). It
writes ``benchmarks/results/overhead.json``.

Both workers run at log level WARNING, so neither writes a log line per task, and both
run without gossip and mingle, as a container does. The plain worker also runs without
the celery-concurrent node supervisor (``--without-concurrent``, where the plugin offers
it), so that side is plain Celery.

What bounds both sides (py-spy): the worker's event-loop thread, busy all the time with
three Redis round trips per message (``BRPOP``, the unacked bookkeeping, the ack). The
task threads mostly wait. The container's own cost, the wake-up pipe, was about 1.5 % of
that thread's samples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import spread
from benchmarks.scenario import APP, Bench, options, rotations, run_main, worker_command
from celery_concurrent.plugin import WORKER_OPTIONS
from devkit.bursts import burst, publish_template
from devkit.processes import cpu_seconds

MAX_INPUTS = 10
TARGET_RATIO = 0.95
COUNTER = "bench:done"
POLL_SECONDS = 0.02

COMMON_ARGS = ("-l", "WARNING", "--without-gossip", "--without-mingle")


@dataclass(frozen=True)
class Side:
    name: str
    task: str
    queue: str
    worker_args: tuple[str, ...]

    @property
    def command(self) -> str:
        return worker_command(self.worker_args)

    @property
    def template(self) -> str:
        return f"bench:template:{self.name}"


@dataclass(frozen=True)
class Run:
    side: str
    round: int
    inputs_per_s: float
    cpu_ms_per_input: float
    drain_s: float
    startup_s: float


def sides(bench: Bench) -> list[Side]:
    ours = f"{APP}.concurrent_noop"
    spec = bench.spec(ours)
    assert spec.max_inputs == MAX_INPUTS, spec
    plain_queue = bench.apps.PLAIN_QUEUE
    plain_only = ("--without-concurrent",) if _plugin_offers("--without-concurrent") else ()
    plain_args = ("-P", "threads", "-c", str(MAX_INPUTS), "-Q", plain_queue)
    return [
        Side("ours", ours, spec.queue, ("--concurrent-function", ours, *COMMON_ARGS)),
        Side("plain", f"{APP}.plain_noop", plain_queue, (*plain_args, *COMMON_ARGS, *plain_only)),
    ]


def _plugin_offers(flag: str) -> bool:
    return any(flag in option.opts for option in WORKER_OPTIONS)


def measure(bench: Bench, side: Side, total: int, round_no: int, timeout: float) -> Run:
    rds = bench.rds
    last_key = f"{COUNTER}:t{total}"
    rds.delete(COUNTER, f"{COUNTER}:t1", last_key)
    burst(rds, side.template, side.queue)
    spawned = time.time()
    # The worker gets "-l INFO" first; our "-l WARNING" comes later and wins.
    proc = bench.start(*side.worker_args)
    try:
        deadline = time.monotonic() + timeout
        cpu_from: tuple[int, float] | None = None  # (inputs done, CPU seconds) at first sight
        while True:
            done = int(rds.get(COUNTER) or 0)
            if done and cpu_from is None:
                cpu_from = (done, cpu_seconds(proc.pid))
            if done >= total and rds.exists(last_key):
                cpu_to = cpu_seconds(proc.pid)
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{side.name} worker exited:\n{bench.workers.tail(proc)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{side.name}: {done} of {total} inputs within {timeout}s:\n"
                    f"{bench.workers.tail(proc)}"
                )
            time.sleep(POLL_SECONDS)
    finally:
        bench.workers.stop(proc)
    done = int(rds.get(COUNTER) or 0)
    if done != total or rds.llen(side.queue) or rds.hlen("unacked"):
        raise RuntimeError(f"{side.name}: {done} of {total} done, backlog left behind")
    assert cpu_from is not None
    first = float(rds.get(f"{COUNTER}:t1") or 0)
    last = float(rds.get(last_key) or 0)
    drain = last - first
    cpu_ms = 1000 * (cpu_to - cpu_from[1]) / max(1, total - cpu_from[0])
    return Run(side.name, round_no, (total - 1) / drain, cpu_ms, drain, first - spawned)


def summarize(runs: list[Run], name: str) -> dict[str, Any]:
    mine = [run for run in runs if run.side == name]
    return {
        "inputs_per_s": spread([run.inputs_per_s for run in mine]),
        "cpu_ms_per_input": spread([run.cpu_ms_per_input for run in mine]),
        "startup_s_median": statistics.median(run.startup_s for run in mine),
    }


def per_round(runs: list[Run], field: str) -> list[float]:
    """ours/plain of ``field`` within each round: the two runs of a round are back to back."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.side] = getattr(run, field)
    return [pair["ours"] / pair["plain"] for pair in by_round.values()]


def run_rounds(bench: Bench, both: list[Side], args: argparse.Namespace) -> list[Run]:
    for side in both:
        publish_template(
            bench.app, bench.rds, side.task, (COUNTER, args.inputs), args.inputs, side.template
        )
    runs: list[Run] = []
    for round_no, side in rotations(both, args.rounds):
        run = measure(bench, side, args.inputs, round_no, args.timeout)
        runs.append(run)
        print(
            f"round {round_no + 1} {side.name:5}: {run.inputs_per_s:6.0f} inputs/s "
            f"{run.cpu_ms_per_input:6.3f} CPU ms/input  (drain {run.drain_s:.2f}s, "
            f"startup {run.startup_s:.2f}s)",
            flush=True,
        )
    return runs


def results_of(runs: list[Run]) -> dict[str, Any]:
    ours, plain = summarize(runs, "ours"), summarize(runs, "plain")
    ratio = ours["inputs_per_s"]["median"] / plain["inputs_per_s"]["median"]
    return {
        "ours": ours,
        "plain": plain,
        "throughput_ratio": ratio,
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "per_round_throughput_ratio": spread(per_round(runs, "inputs_per_s")),
        "cpu_ratio_plain_over_ours": plain["cpu_ms_per_input"]["median"]
        / ours["cpu_ms_per_input"]["median"],
    }


def print_summary(both: list[Side], results: dict[str, Any]) -> None:
    print()
    print(
        f"{'side':6} {'median/s':>9} {'min/s':>7} {'max/s':>7} "
        f"{'CPU ms/input':>13} {'min':>6} {'max':>6}  command"
    )
    for side in both:
        rate, cpu = results[side.name]["inputs_per_s"], results[side.name]["cpu_ms_per_input"]
        print(
            f"{side.name:6} {rate['median']:9.0f} {rate['min']:7.0f} {rate['max']:7.0f} "
            f"{cpu['median']:13.3f} {cpu['min']:6.3f} {cpu['max']:6.3f}  {side.command}"
        )
    ratio, rounds = results["throughput_ratio"], results["per_round_throughput_ratio"]
    verdict = "meets" if results["meets_target"] else "misses"
    print(f"throughput ratio ours/plain: {ratio:.3f} ({verdict} the target {TARGET_RATIO})")
    print(
        f"per-round throughput ratio: median {rounds['median']:.3f}, "
        f"min {rounds['min']:.3f}, max {rounds['max']:.3f}"
    )
    print(
        f"CPU per input ratio plain/ours: {results['cpu_ratio_plain_over_ours']:.3f} "
        "(>= 1: ours costs no more)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = options("overhead", __doc__)
    parser.add_argument("--inputs", type=int, default=4000, help="backlog K per run")
    parser.add_argument(
        "--rounds", type=int, default=8, help="runs of each side (even: each side leads as often)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run, at most")
    bench = Bench("overhead", parser, argv)
    args = bench.args
    with bench:
        both = sides(bench)
        runs = run_rounds(bench, both, args)
    results = results_of(runs)
    print_summary(both, results)
    parameters = {
        "inputs_per_run": args.inputs,
        "rounds_per_side": args.rounds,
        "max_inputs": MAX_INPUTS,
        "plain_concurrency": MAX_INPUTS,
        "plain_prefetch_multiplier": 4,
        "throughput": "(K - 1) / (t_K - t_1): first to last completion of a pre-loaded backlog",
        "cpu": "worker process user+system CPU from the first seen completion to the last, "
        "per input",
    }
    workers = {side.name: side.command for side in both}
    bench.write(parameters, workers, results, runs=[asdict(run) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
