"""``@batched`` against celery-batches and plain ``@concurrent``, on one model step.

Run it with ``python -m benchmarks.bench_batching`` from the repository root. The
celery-batches side needs the package (``pip install --no-deps celery-batches``: its
0.11 declares ``celery<5.7``, but runs on 5.7); without it that side is left out.

The work (:mod:`benchmarks.batching_app`): a model step that costs 20 ms whether it
carries 1 item or 32, one step at a time per worker process. Three workers run side by
side on one private Redis, each on its own queue, each warm before the first round:

- **batched**: one container of ``@concurrent(max_inputs=2) @batched(max_batch_size=32,
  wait_ms=20)``; it holds at most 2 x 32 messages;
- **batches**: celery-batches (``flush_every=32``, ``flush_interval=0.02``) on a plain
  worker, ``-P threads -c 2 --prefetch-multiplier 32`` (it holds 64 as well);
- **single**: one container of plain ``@concurrent(max_inputs=32)``: one item a step.

Three loads, each side in turn leading a round (:func:`~benchmarks.scenario.rotations`):

- **burst**: ``--burst`` items put in the queue at one instant (Redis ``COPY``);
- **steady**: ``--rate`` items a second for ``--seconds``, each sent on its own;
- **trickle**: 10 items a second: a lone input at a time.

Per run: items per second (items / from the first send to the last completion), the
latency of each item (its completion less its send) at p50 and p95, and the mean batch
size. Results are ignored on every side (celery-batches stores none by itself).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import spread
from benchmarks.scenario import Bench, WorkerSide, options, rotations, run_main
from devkit.bursts import burst, publish_template

APP = "benchmarks.batching_app"
COMMON_ARGS = ("-l", "WARNING", "--without-gossip", "--without-mingle")
TRICKLE_RATE = 10.0


@dataclass(frozen=True)
class Run:
    side: str
    load: str
    round: int
    items: int
    items_per_s: float
    p50_ms: float
    p95_ms: float
    mean_batch: float


def sides(app_module: Any) -> list[WorkerSide]:
    from celery_concurrent import spec_of

    made = []
    for name in ("batched", "single"):
        task = f"{APP}.model_{name}"
        spec = spec_of(app_module.app.tasks[task])
        worker = ("--concurrent-function", task, *COMMON_ARGS)
        made.append(WorkerSide(name, task, spec.queue, worker, APP))
    if app_module.Batches is not None:
        args = ("-P", "threads", "-c", "2", "--prefetch-multiplier", "32")
        queue = app_module.BATCHES_QUEUE
        worker = (*args, "-Q", queue, "--without-concurrent", *COMMON_ARGS)
        made.insert(1, WorkerSide("batches", f"{APP}.model_batches", queue, worker, APP))
    return made


def records(side: WorkerSide) -> str:
    return f"bench:batching:{side.name}"


def wait_done(bench: Bench, side: WorkerSide, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while bench.rds.llen(records(side)) < total:
        if time.monotonic() > deadline:
            done = bench.rds.llen(records(side))
            raise TimeoutError(f"{side.name}: {done} of {total} items within {timeout}s")
        time.sleep(0.01)


def send_at_rate(bench: Bench, side: WorkerSide, rate: float, seconds: float) -> tuple[float, int]:
    """Send ``rate`` items a second for ``seconds``; return the first send and the count."""
    task = bench.app_module.app.tasks[side.task]
    total = max(1, round(rate * seconds))
    began = time.time()
    with bench.app_module.app.producer_or_acquire() as producer:
        for n in range(total):
            pause = began + n / rate - time.time()
            if pause > 0:
                time.sleep(pause)
            task.apply_async((time.time(),), producer=producer)
    return began, total


def measure(
    bench: Bench, side: WorkerSide, load: str, round_no: int, args: argparse.Namespace
) -> Run:
    rds = bench.rds
    rds.delete(records(side), f"{records(side)}:sizes")
    if load == "burst":
        began, total = burst(rds, f"bench:batching:template:{side.name}", side.queue), args.burst
    else:
        rate = args.rate if load == "steady" else TRICKLE_RATE
        began, total = send_at_rate(bench, side, rate, args.seconds)
    wait_done(bench, side, total, args.timeout)
    pairs = [line.split() for line in rds.lrange(records(side), 0, -1)]
    # A burst's items were all sent at the burst's instant (their own stamp says 0).
    latencies = sorted(float(done) - (float(sent) or began) for sent, done in pairs)
    sizes = [int(n) for n in rds.lrange(f"{records(side)}:sizes", 0, -1)]
    last = max(float(done) for _, done in pairs)
    return Run(
        side.name,
        load,
        round_no,
        total,
        total / (last - began),
        1000 * latencies[len(latencies) // 2],
        1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        statistics.mean(sizes),
    )


def start_warm(bench: Bench, both: list[WorkerSide], args: argparse.Namespace) -> None:
    """Start every side's worker, publish its burst, and run a few items through it."""
    for side in both:
        bench.workers.start(side.app, *side.worker_args, wait_ready=False)
        template = f"bench:batching:template:{side.name}"
        publish_template(bench.app_module.app, bench.rds, side.task, (0.0,), args.burst, template)
    for side in both:
        send_at_rate(bench, side, 50.0, 0.1)
        wait_done(bench, side, 5, 90)


def run_rounds(bench: Bench, both: list[WorkerSide], args: argparse.Namespace) -> list[Run]:
    start_warm(bench, both, args)
    runs = []
    for load in ("burst", "steady", "trickle"):
        for round_no, side in rotations(both, args.rounds):
            run = measure(bench, side, load, round_no, args)
            runs.append(run)
            print(
                f"{load:7} round {round_no + 1} {side.name:7}: {run.items_per_s:7.1f} items/s  "
                f"p50 {run.p50_ms:7.1f} ms  p95 {run.p95_ms:7.1f} ms  "
                f"mean batch {run.mean_batch:5.1f}",
                flush=True,
            )
    return runs


def results_of(runs: list[Run], both: list[WorkerSide]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in ("burst", "steady", "trickle"):
        out[load] = {}
        for side in both:
            mine = [r for r in runs if r.side == side.name and r.load == load]
            out[load][side.name] = {
                key: spread([getattr(r, key) for r in mine])
                for key in ("items_per_s", "p50_ms", "p95_ms", "mean_batch")
            }
    return out


def print_summary(results: dict[str, Any]) -> None:
    print(f"\n{'load':8} {'side':8} {'items/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'batch':>6}")
    for load, by_side in results.items():
        for name, figures in by_side.items():
            print(
                f"{load:8} {name:8} {figures['items_per_s']['median']:9.1f} "
                f"{figures['p50_ms']['median']:8.1f} {figures['p95_ms']['median']:8.1f} "
                f"{figures['mean_batch']['median']:6.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = options("batching", __doc__)
    parser.add_argument("--burst", type=int, default=1024, help="items in a burst")
    parser.add_argument("--rate", type=float, default=200.0, help="items/s of the steady load")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a sent load")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side and load")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    bench = Bench("batching", parser, argv)
    with bench:
        bench.app_module = importlib.import_module(APP)  # the broker is known now
        both = sides(bench.app_module)
        runs = run_rounds(bench, both, bench.args)
    results = results_of(runs, both)
    print_summary(results)
    app_module = bench.app_module
    parameters = {
        "step_seconds": app_module.STEP_SECONDS,
        "max_batch_size": app_module.MAX_BATCH,
        "wait_ms": app_module.WAIT_MS,
        **{k: v for k, v in vars(bench.args).items() if k != "output"},
    }
    workers = {side.name: side.command for side in both}
    bench.write(parameters, workers, results, runs=[asdict(run) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
