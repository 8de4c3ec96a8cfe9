"""CPU per input at 100 threads: one sync container against plain Celery's threads pool.

Run it with ``python -m benchmarks.bench_threads`` from the repository root.

Both workers stay up; rounds alternate which goes first (a warm-up round is not
counted). In each round the benchmark publishes 2,000 inputs of ``time.sleep(0.5)`` with
``apply_async`` (the run starts with the first publish, so the worker takes them in while
they are published), a Redis result backend is on (``BENCH_RESULT_BACKEND``), and the
run ends when every result is stored. Sides:

- **ours**: one container, ``celery -A benchmarks.apps worker --concurrent-function
  benchmarks.apps.threads_ours`` (``max_inputs=100``);
- **plain**: ``celery -A benchmarks.apps worker -P threads -c 100 --without-concurrent``
  (plain Celery, default prefetch).

CPU per input is the worker process's user + system CPU (``/proc``) from the first
publish to the last result, over the inputs; also its system share and the main thread's
(the event loop). Target (issue 17): ours <= 0.5x plain. ``--py-spy PATH`` runs one more
round of each side under ``py-spy record --gil --threads --format raw`` (written to
``results/profiles/``).

What the profile showed (py-spy ``--gil``, 500 Hz, 2,000 inputs, before the fix; shares
of the samples holding the GIL): on both sides about 90 % is Celery's, kombu's, redis-py's
and the task's own work. Ours: input threads 59 % (the result backend's ``store_result``
21 %: a ``GET`` of the old meta, then ``SET`` + ``PUBLISH``; redis-py's per-command
code 24 %; the tracer; the tally's ``EVAL`` 6 %), the event loop 40 % (kombu's delivery,
the intake's take and acks). Our own frames were 12.7 %: the input thread waking at the
pool queue's ``get`` 6.8 % (a container holds no more than its free slots, so every
thread waits for its next message; plain's executor queue holds the prefetched ones),
and the wake-up pipe's ``os.write`` 3.4 %. Plain: the event loop 52 % (kombu's ack, one
round trip a message, 14 %), its threads 48 %, ``concurrent.futures`` 2.4 %. Alone, with
no broker (100 threads, sleeping inputs), the pool cost 84 us an input against 46 us for
Celery's; 29 us of the difference was the pipe (two writes an input, each a system call
and a GIL hand-off among 100 threads). The fix: a wake-up already pending is not
written again (``SlotWakeup.notify``), 84 -> about 54 us.

The floor: ours already costs about what plain Celery does (ratio 0.9-1.05 in these
runs); what is left is per-message work both sides share (taking, decoding and acking
the message, the tracer, storing the result, the task's own Redis call), about 1.2-1.5 ms
an input on this machine. 0.5x would need less work per message than Celery itself does,
not a cheaper pool: even a free pool would leave ours near 0.9x.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import reset_tally, spread, wait_for_tally
from benchmarks.scenario import (
    APP,
    RESULTS,
    Bench,
    WorkerSide,
    options,
    rotations,
    run_main,
)

OURS = f"{APP}.threads_ours"
PLAIN = f"{APP}.threads_plain"
#: ours/plain of the CPU per input, the goal (issue 17)
TARGET_CPU_RATIO = 0.5
#: :data:`benchmarks.apps.RESULT_BACKEND_FLAG` (the harness imports the app later)
RESULT_BACKEND_FLAG = "BENCH_RESULT_BACKEND"
QUIET = ("-l", "WARNING", "--without-gossip", "--without-mingle")


@dataclass(frozen=True)
class Cpu:
    """A worker's CPU seconds so far: user, system, and the main thread's (both)."""

    user: float
    system: float
    main_thread: float

    @classmethod
    def of(cls, pid: int) -> Cpu:
        user, system = _stat_times(f"/proc/{pid}/stat")
        return cls(user, system, sum(_stat_times(f"/proc/{pid}/task/{pid}/stat")))

    def ms_per_input(self, before: Cpu, inputs: int) -> tuple[float, float, float]:
        """(all, system, main thread) ms per input since ``before``."""
        return (
            1000 * (self.user + self.system - before.user - before.system) / inputs,
            1000 * (self.system - before.system) / inputs,
            1000 * (self.main_thread - before.main_thread) / inputs,
        )


def _stat_times(path: str) -> tuple[float, float]:
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass(frozen=True)
class Run:
    side: str
    round: int
    #: the worker process's CPU (user + system) from the first publish to the last result
    cpu_ms_per_input: float
    #: of which in the kernel (system time), and on the main thread (the event loop)
    system_ms_per_input: float
    main_thread_ms_per_input: float
    #: from the first publish to the last input finishing
    wall_s: float
    #: how long the ``apply_async`` loop took
    publish_s: float


def sides(bench: Bench) -> list[WorkerSide]:
    spec = bench.spec(OURS)
    slots = str(spec.max_inputs)
    plain_queue = bench.apps.THREADS_QUEUE
    plain_args = ("-P", "threads", "-c", slots, "-Q", plain_queue, "--without-concurrent")
    return [
        WorkerSide("ours", OURS, spec.queue, ("--concurrent-function", OURS, *QUIET)),
        WorkerSide("plain", PLAIN, plain_queue, (*plain_args, *QUIET)),
    ]


def wait_ready(bench: Bench, side: WorkerSide, proc: Any, timeout: float) -> None:
    """One input through the worker: it is up, connected and its first thread started."""
    key = f"bench:threads:ready:{side.name}"
    reset_tally(bench.rds, key)
    bench.app.tasks[side.task].apply_async((key, 1, 0.0)).get(timeout=timeout)
    wait_for_tally(bench.rds, key, 1, timeout, alive=proc)


def measure(
    bench: Bench, side: WorkerSide, proc: Any, round_no: int, args: argparse.Namespace
) -> Run:
    key = f"bench:threads:{side.name}:{round_no}"
    reset_tally(bench.rds, key)
    task = bench.app.tasks[side.task]
    cpu_before = Cpu.of(proc.pid)
    with bench.app.producer_or_acquire() as producer:
        began = time.time()
        results = [
            task.apply_async((key, args.inputs, args.seconds), producer=producer)
            for _ in range(args.inputs)
        ]
        published = time.time() - began
    try:
        tally = wait_for_tally(bench.rds, key, args.inputs, args.timeout, alive=proc)
        # every result is stored by now; the CPU counts what storing them cost
        bench.app.ResultSet(results).join(timeout=args.timeout)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{side.name}: {exc}\n{bench.workers.tail(proc)}") from exc
    cpu = Cpu.of(proc.pid).ms_per_input(cpu_before, args.inputs)
    return Run(side.name, round_no, *cpu, tally.last_finish - began, published)


def profile(
    bench: Bench, side: WorkerSide, proc: Any, args: argparse.Namespace
) -> tuple[Run, Path]:
    """One more round (not counted) under ``py-spy record``; its raw (collapsed) stacks."""
    out = args.profile_dir / f"threads-{side.name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = math.ceil(args.inputs / bench.spec(OURS).max_inputs * args.seconds) + 2
    spy = subprocess.Popen(
        [str(args.py_spy), "record", "--pid", str(proc.pid), "--gil", "--nonblocking", "--threads"]
        + ["--format", "raw", "--rate", "500", "--duration", str(seconds), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # py-spy attaches
        run = measure(bench, side, proc, -2, args)
        spy.wait(seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    return run, out


def run_rounds(
    bench: Bench, both: list[WorkerSide], args: argparse.Namespace
) -> tuple[list[Run], dict[str, Any]]:
    procs = {side.name: bench.start(*side.worker_args) for side in both}
    for side in both:
        wait_ready(bench, side, procs[side.name], args.timeout)
    runs: list[Run] = []
    for round_no, side in rotations(both, args.rounds, warm_up=True):
        run = measure(bench, side, procs[side.name], round_no, args)
        if round_no < 0:
            continue
        runs.append(run)
        print(
            f"round {round_no + 1} {side.name:5}: {run.cpu_ms_per_input:6.3f} CPU ms/input "
            f"(system {run.system_ms_per_input:.3f}, main thread "
            f"{run.main_thread_ms_per_input:.3f}), "
            f"wall {run.wall_s:6.2f} s (publishing {run.publish_s:.2f} s)",
            flush=True,
        )
    profiles: dict[str, Any] = {}
    if args.py_spy is not None:
        for side in both:
            run, out = profile(bench, side, procs[side.name], args)
            profiles[side.name] = {"output": str(out), "run": asdict(run)}
            print(f"profiled {side.name}: {run.cpu_ms_per_input:.3f} CPU ms/input -> {out}")
    return runs, profiles


def results_of(runs: list[Run], both: list[WorkerSide]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for side in both:
        mine = [run for run in runs if run.side == side.name]
        results[side.name] = {
            "cpu_ms_per_input": spread([run.cpu_ms_per_input for run in mine]),
            "system_ms_per_input": spread([run.system_ms_per_input for run in mine]),
            "main_thread_ms_per_input": spread([run.main_thread_ms_per_input for run in mine]),
            "wall_s": spread([run.wall_s for run in mine]),
            "publish_s": spread([run.publish_s for run in mine]),
        }
    ratio = (
        results["ours"]["cpu_ms_per_input"]["median"]
        / results["plain"]["cpu_ms_per_input"]["median"]
    )
    return results | {
        "cpu_ratio_ours_over_plain": ratio,
        "wall_ratio_ours_over_plain": results["ours"]["wall_s"]["median"]
        / results["plain"]["wall_s"]["median"],
        "target_cpu_ratio": TARGET_CPU_RATIO,
        "meets_target": ratio <= TARGET_CPU_RATIO,
    }


def print_summary(both: list[WorkerSide], results: dict[str, Any]) -> None:
    print()
    print(f"{'side':6} {'CPU ms/input':>13} {'min':>6} {'max':>6} {'wall s':>7}  command")
    for side in both:
        cpu, wall = results[side.name]["cpu_ms_per_input"], results[side.name]["wall_s"]
        print(
            f"{side.name:6} {cpu['median']:13.3f} {cpu['min']:6.3f} {cpu['max']:6.3f} "
            f"{wall['median']:7.2f}  {side.command}"
        )
    verdict = "meets" if results["meets_target"] else "misses"
    print(
        f"CPU per input ours/plain: {results['cpu_ratio_ours_over_plain']:.3f} ({verdict} "
        f"the target <= {TARGET_CPU_RATIO}); wall ours/plain "
        f"{results['wall_ratio_ours_over_plain']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = options("threads", __doc__)
    parser.add_argument("--inputs", type=int, default=2000, help="inputs per run")
    parser.add_argument("--seconds", type=float, default=0.5, help="each input's sleep")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each side")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    parser.add_argument(
        "--py-spy", type=Path, default=None, help="py-spy to profile one more run of each side"
    )
    parser.add_argument("--profile-dir", type=Path, default=RESULTS / "profiles")
    os.environ[RESULT_BACKEND_FLAG] = "1"  # before the harness imports the app
    bench = Bench("threads", parser, argv)
    args = bench.args
    with bench:
        both = sides(bench)
        threads = bench.spec(OURS).max_inputs
        runs, profiles = run_rounds(bench, both, args)
    results = results_of(runs, both)
    print_summary(both, results)
    parameters = {
        "inputs_per_run": args.inputs,
        "seconds_per_input": args.seconds,
        "rounds_per_side": args.rounds,
        "threads": threads,
        "result_backend": "the broker's Redis",
        "publishing": "apply_async in a loop from the first instant of the run",
        "cpu": "the worker process's user + system CPU from the first publish to the last "
        "result stored, over the inputs",
        "wall": "from the first publish to the last input finishing",
    }
    workers = {side.name: side.command for side in both}
    bench.write(parameters, workers, results, runs=[asdict(run) for run in runs], profiles=profiles)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
