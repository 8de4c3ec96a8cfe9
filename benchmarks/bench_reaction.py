"""Scale-up reaction time, side by side, and the supervisor's idle cost.

Run it with ``python -m benchmarks.bench_reaction`` from the repository root.

Reaction time is the time from a burst to the first input running on a process that
did not exist before the burst. The burst is ``B`` inputs (10 by default) published at
once to a function with no process to run them; the publisher takes ``time.monotonic()``
just before the first publish. Each input stamps ``time.monotonic()`` into Redis as its
first act, with its node name and PID (``CLOCK_MONOTONIC`` is system-wide on Linux, so
the two stamps compare across processes). Four sides take turns on one private Redis,
each waiting until its side is cold again before the next burst:

- **ours**: a node, ``celery -A benchmarks.apps worker -c 1 --concurrent-functions
  benchmarks.apps.reaction_ours``, supervises a function at ``keep_warm=0``,
  ``concurrency_limit=1``, ``max_inputs=10`` and ``scaledown_window=0.5``: every burst
  finds no container and ends in one new container, forked from the node's preloaded
  fork server. The clock includes the supervisor noticing the backlog (it reads it
  every 50 ms), the fork, the worker's start-up, its broker connection and its first
  fetch. After the burst the container retires (idle 0.5 s, then a drain) and the
  next burst waits for zero containers.
- **flanked**: ours again, on a node of its own that supervises a second function,
  ``benchmarks.apps.reaction_flood`` (``max_inputs=50``, ``concurrency_limit=2``,
  ``keep_warm=0``). Just before each burst the benchmark floods that function with
  400 inputs of ``sleep(0.2)``, so the burst lands while the flood's backlog waits and
  its containers start: the reaction of one function beside another's flood, which the
  test suite asserts only as an order of events ("a flood of one function never delays
  another"). After the burst the flood's backlog is dropped and the side waits until
  both functions are cold, so that no other side's burst meets it.
- **exec**: at burst time the benchmark itself execs a container, ``celery -A
  benchmarks.apps worker --concurrent-function benchmarks.apps.reaction_exec``, as a
  naive supervisor or KEDA starting a pod would. It is told at once, with no poll at
  all, so this is a lower bound for any scaler that starts an interpreter per
  container. The process is stopped after the burst.
- **autoscale**: Celery's own ``celery -A benchmarks.apps worker --autoscale=4,0``
  (prefork) consumes the plain task ``reaction_plain``. Its main process reserves the
  messages and, on each one, grows the pool by forking itself (no new broker connection,
  the app is already imported), then hands the input to the new process. The first
  input that runs in a PID absent before the burst ends the clock. To get a cold pool
  for every burst, this worker runs with ``AUTOSCALE_KEEPALIVE=1`` (the scale-down delay;
  Celery's default is 30 s); growing does not depend on it.

Each input also stamps its process's life (``benchmarks.apps.LIFE``): when it was forked
or imported, when its ``celery worker`` was created (``celeryd_init``) and when its
consumer was ready (``worker_ready``). The report splits the median reaction into those
phases, which is where a profile of a cold start begins.

Where the time of ours goes (2 cores, load about 1; py-spy, then the phases above):

- burst -> forked, about 25 ms: mostly the supervisor's poll, which sees the backlog on
  average half an interval (25 ms at 50 ms) after the burst; then an ``LLEN`` and the
  fork server's round trip, a few ms. This is the floor at the default interval
  (``--concurrent-poll-interval`` trades it against idle CPU).
- forked -> consumer ready, about 30 ms: ``app.Worker`` and its bootsteps, logging, the
  thread pool, the broker connection and declaring the queue.
- consumer ready -> first input, 2-3 ms: the first fetch.

The container used to import about 60 modules on its way to its first input
(``celery.apps.worker``, the consumer's bootsteps, ``celery.app.control``, the kombu
transport and, through ``kombu.matcher``, ``difflib``): about 30 ms of every cold start,
and p50 was 76-90 ms. The fork server now imports them once
(``celery_concurrent.supervisor.launcher.CONTAINER_MODULES``).

Celery's ``--autoscale`` reacts in its main process, one message at a time ("Scaling up
1 processes"): it forks a pool process 40-60 ms after the burst, and billiard's process
start-up takes about as long again before the first input runs there. The exec'd
container spends about 250 ms starting the interpreter and importing Celery and the app
before its worker exists.

Rounds rotate which side goes first, so a drift of the machine weighs on all alike; a
warm-up round (fork server, page cache) is not counted. Each burst waits a random pause
(up to four poll intervals) once its side is cold: a container's last load report wakes
the supervisor just before it exits, so a burst sent the moment the side turns cold
would land at the same point of the supervisor's poll every time (40-50 ms after it, the
worst case) instead of anywhere in it, as a real burst does.

Idle cost: a node supervising two functions with ``keep_warm=1`` (a threads and an
asyncio container) and no traffic; the node's main process's CPU time (user + system,
all threads, from ``/proc/<pid>/stat``) over ``--idle-seconds``, as a share of one core
(target <= 2 %), then the containers' and the fork server's on their own. The same node
with ``--without-concurrent`` gives plain Celery's own idle cost, so the difference is
the supervisor's.

The report prints a table (p50, p95, min, max, ratios to ours) and writes
``benchmarks/results/reaction.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from benchmarks.common import JITTER_SECONDS, wait_until
from benchmarks.scenario import APP, Bench, options, rotations, run_main, worker_command
from celery_concurrent.supervisor.supervisor import DEFAULT_POLL_INTERVAL
from devkit.processes import children, containers_of, cpu_seconds

OURS = f"{APP}.reaction_ours"
FLANKED = f"{APP}.reaction_flanked"
FLOOD = f"{APP}.reaction_flood"
#: the flood published to the other function just before each burst of ``flanked``
FLOOD_INPUTS = 400
#: how long a side may take to turn cold after its burst
COLD_TIMEOUT = 60.0
EXEC = f"{APP}.reaction_exec"
PLAIN = f"{APP}.reaction_plain"
IDLE_FUNCTIONS = (f"{APP}.idle_sync", f"{APP}.idle_async")
TARGET_P50_MS = 150.0
TARGET_IDLE_SHARE = 0.02
AUTOSCALE = "4,0"
AUTOSCALE_KEEPALIVE = "1"
QUIET = ("-l", "WARNING")
#: The node as a user runs it, with one pool process for plain tasks.
NODE_ARGS = ("-c", "1", *QUIET)
#: the phases of a cold start, in order, as stamped by the input's process
PHASES = ("forked", "imported", "worker_created", "consumer_ready")


@dataclass
class Start:
    """One input's start stamp, as the task wrote it."""

    at: float
    host: str | None
    pid: int
    life: dict[str, float]

    @property
    def born(self) -> float:
        """When the process that ran the input began: forked, or else imported the app."""
        return self.life.get("forked", self.life.get("imported", 0.0))


@dataclass
class Sample:
    side: str
    round: int
    reaction_ms: float
    #: milliseconds from the burst to each stamp of the first input's process
    phases_ms: dict[str, float] = field(default_factory=dict)


class Side:
    """One way of reacting to a burst: how to make it cold, burst, and tell a new process."""

    name: str
    task: str
    #: the Redis list the inputs of the current burst stamp their starts into
    key: str = ""
    env: dict[str, str] = {}

    def __init__(self, bench: Bench) -> None:
        self.bench, self.rds, self.app = bench, bench.rds, bench.app
        #: the side's worker process (the node, the exec'd container, the autoscaler)
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def command(self) -> str:
        return worker_command(self.args(), self.env)

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = self.bench.start(*self.args(), env=self.env)
        return self.proc

    def setup(self) -> None:
        self.start()

    def wait_cold(self, timeout: float) -> None:
        pass

    def before_burst(self) -> None:
        pass

    def after_burst(self) -> None:
        pass

    def is_new(self, start: Start) -> bool:
        raise NotImplementedError

    def teardown(self) -> None:
        if self.proc is not None:
            self.bench.workers.stop(self.proc)
            self.proc = None

    def burst(self, key: str, size: int) -> float:
        """Publish ``size`` inputs at once; return the burst time."""
        task = self.app.tasks[self.task]
        with self.app.producer_or_acquire() as producer:
            began = time.monotonic()
            for _ in range(size):
                task.apply_async((key,), producer=producer)
        return began


class Ours(Side):
    name = "ours"
    task = OURS

    def args(self) -> tuple[str, ...]:
        return (*NODE_ARGS, "-n", "reaction@%h", "--concurrent-functions", OURS)

    def setup(self) -> None:
        self.start()
        self.seen: set[int] = set()

    def wait_cold(self, timeout: float) -> None:
        assert self.proc is not None
        node = self.proc.pid
        wait_until(lambda: not containers_of(node), timeout, "ours: cold", self.proc)

    def is_new(self, start: Start) -> bool:
        # Container names are reused (the lowest free ident), so tell them by PID.
        return start.pid not in self.seen

    def after_burst(self) -> None:
        self.seen.update(start.pid for start in read_starts(self.rds, self.key))


class Flanked(Ours):
    name = "flanked"
    task = FLANKED

    def args(self) -> tuple[str, ...]:
        functions = f"{FLANKED},{FLOOD}"
        return (*NODE_ARGS, "-n", "flanked@%h", "--concurrent-functions", functions)

    def before_burst(self) -> None:
        flood = self.app.tasks[FLOOD]
        with self.app.producer_or_acquire() as producer:
            for _ in range(FLOOD_INPUTS):
                flood.apply_async(producer=producer)

    def after_burst(self) -> None:
        super().after_burst()
        spec = self.bench.spec(FLOOD)
        # What the flood still has waiting is dropped: no other side's burst meets it.
        self.rds.delete(spec.queue)
        self.wait_cold(COLD_TIMEOUT)


class Exec(Side):
    name = "exec"
    task = EXEC

    def args(self) -> tuple[str, ...]:
        return ("--concurrent-function", EXEC, *QUIET)

    def setup(self) -> None:
        pass  # it starts at each burst

    def burst(self, key: str, size: int) -> float:
        began = super().burst(key, size)
        self.start()
        return began

    def is_new(self, start: Start) -> bool:
        return self.proc is not None and start.pid == self.proc.pid

    def after_burst(self) -> None:
        self.teardown()


class Autoscale(Side):
    name = "autoscale"
    task = PLAIN
    env = {"AUTOSCALE_KEEPALIVE": AUTOSCALE_KEEPALIVE}

    def args(self) -> tuple[str, ...]:
        queue = self.bench.apps.REACTION_PLAIN_QUEUE
        return (
            f"--autoscale={AUTOSCALE}",
            *("-n", "autoscale@%h", "-Q", queue, "--without-concurrent"),
            *QUIET,
        )

    def setup(self) -> None:
        self.start()
        self.before: set[int] = set()

    def pool_pids(self) -> set[int]:
        return {child.pid for child in children(self.proc.pid)} if self.proc else set()

    def wait_cold(self, timeout: float) -> None:
        wait_until(lambda: not self.pool_pids(), timeout, "autoscale: empty pool", self.proc)

    def before_burst(self) -> None:
        assert self.proc is not None
        self.before = self.pool_pids() | {self.proc.pid}

    def is_new(self, start: Start) -> bool:
        return start.pid not in self.before


def read_starts(rds: redis.Redis, key: str) -> list[Start]:
    starts = []
    for raw in rds.lrange(key, 0, -1):
        stamp = json.loads(raw)
        life = {phase: stamp[phase] for phase in PHASES if phase in stamp}
        starts.append(Start(stamp["at"], stamp["host"], stamp["pid"], life))
    return starts


def measure(side: Side, round_no: int, size: int, timeout: float, jitter: float) -> Sample:
    key = f"bench:reaction:{side.name}:{round_no}"
    side.key = key
    side.wait_cold(timeout)
    # A side turns cold in step with its own clock (a container exits just after it last
    # woke the supervisor); a real burst arrives at any moment of the poll.
    time.sleep(jitter)
    side.before_burst()
    began = side.burst(key, size)
    try:
        wait_until(lambda: side.rds.llen(key) >= size, timeout, f"{side.name}: {size} inputs")
        starts = read_starts(side.rds, key)
        new = [start for start in starts if side.is_new(start) and start.born >= began]
    finally:
        side.after_burst()
    if not new:
        raise RuntimeError(f"{side.name}: no input of the burst ran on a new process: {starts}")
    first = min(new, key=lambda start: start.at)
    phases = {phase: 1000 * (at - began) for phase, at in first.life.items() if at >= began}
    return Sample(side.name, round_no, 1000 * (first.at - began), phases)


# -- idle cost ---------------------------------------------------------------------


def cpu_of(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def shares(groups: dict[str, list[int]], seconds: float) -> dict[str, list[float]]:
    """CPU share of one core of each process, over the same ``seconds``, by group."""
    before = {name: [cpu_of([pid]) for pid in pids] for name, pids in groups.items()}
    began = time.monotonic()
    time.sleep(seconds)
    after = {name: [cpu_of([pid]) for pid in pids] for name, pids in groups.items()}
    wall = time.monotonic() - began
    return {
        name: [(b - a) / wall for a, b in zip(before[name], after[name], strict=True)]
        for name in groups
    }


def supervisor_turns_per_second(app: Any, node: str) -> float | None:
    """How often the node's supervisor ran a turn since it started (``inspect stats``)."""
    replies = app.control.inspect(destination=[node], timeout=2.0).stats() or {}
    stats = replies.get(node, {})
    turns, uptime = stats.get("concurrent", {}).get("turns"), stats.get("uptime")
    return turns / uptime if turns and uptime else None


def measure_idle(bench: Bench, seconds: float, baseline_seconds: float) -> dict[str, Any]:
    name = f"idle@{socket.gethostname()}"
    args = (*NODE_ARGS, "-n", name, "--concurrent-functions", ",".join(IDLE_FUNCTIONS))
    found, turns = idle_shares(bench, args, name, seconds)
    base_args = (*NODE_ARGS, "-n", "plain@%h", "--without-concurrent")
    plain = bench.start(*base_args)
    try:
        time.sleep(3)
        plain_share = shares({"node": [plain.pid]}, baseline_seconds)["node"][0]
    finally:
        bench.workers.stop(plain)
    node_share = found["node"][0]
    supervisor_share = node_share - plain_share
    return {
        "node_main_process_share": node_share,
        "target": TARGET_IDLE_SHARE,
        "meets_target": node_share <= TARGET_IDLE_SHARE,
        "plain_node_main_process_share": plain_share,
        "supervisor_share": supervisor_share,
        "supervisor_turns_per_s": turns,
        "supervisor_cpu_ms_per_turn": 1000 * supervisor_share / turns if turns else None,
        "containers_share_total": sum(found["containers"]),
        "containers_share_each": found["containers"],
        "node_children_share": sum(found["children"]),
        "seconds": seconds,
        "baseline_seconds": baseline_seconds,
        "node_command": worker_command(args).replace(name, "idle@%h"),
        "plain_node_command": worker_command(base_args),
    }


def idle_shares(
    bench: Bench, args: tuple[str, ...], name: str, seconds: float
) -> tuple[dict[str, list[float]], float | None]:
    """The idle node's CPU shares (main process, containers, other children) and how
    often its supervisor ran a turn."""
    node = bench.start(*args)
    try:
        wait_until(
            lambda: len(containers_of(node.pid)) == len(IDLE_FUNCTIONS),
            60,
            "idle node: keep_warm containers",
            node,
        )
        time.sleep(3)  # every container connected and settled
        found = shares(
            {
                "node": [node.pid],
                "containers": [p.pid for p in containers_of(node.pid)],
                # the fork server, the node's pool process, multiprocessing's tracker
                "children": [p.pid for p in children(node.pid)],
            },
            seconds,
        )
        return found, supervisor_turns_per_second(bench.app, name)
    finally:
        bench.workers.stop(node)


# -- report ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, linear between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    values = [sample.reaction_ms for sample in samples]
    phases: dict[str, float] = {}
    for phase in PHASES:
        found = [s.phases_ms[phase] for s in samples if phase in s.phases_ms]
        if len(found) == len(samples):
            phases[phase] = statistics.median(found)
    return {
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "min_ms": min(values),
        "max_ms": max(values),
        "mean_ms": statistics.fmean(values),
        "samples": len(values),
        "median_ms_from_burst_to": phases,
    }


def run_rounds(sides: list[Side], args: argparse.Namespace) -> list[Sample]:
    samples: list[Sample] = []
    jitter = random.Random(args.seed)
    for side in sides:
        side.setup()
    for round_no, side in rotations(sides, args.rounds, warm_up=True):
        pause = jitter.uniform(0, JITTER_SECONDS)
        sample = measure(side, round_no, args.burst, args.timeout, pause)
        if round_no < 0:
            continue
        samples.append(sample)
        in_round = [s for s in samples if s.round == round_no]
        if len(in_round) == len(sides):
            line = "  ".join(f"{s.side} {s.reaction_ms:6.1f} ms" for s in in_round)
            print(f"round {round_no + 1:2}: {line}", flush=True)
    return samples


def print_table(results: dict[str, dict[str, Any]], commands: dict[str, str]) -> None:
    ours = results["ours"]
    print()
    print(
        f"{'side':10} {'p50 ms':>7} {'p95 ms':>7} {'min ms':>7} {'max ms':>7} "
        f"{'p50/ours':>9} {'p95/ours':>9}  command"
    )
    for name, numbers in results.items():
        print(
            f"{name:10} {numbers['p50_ms']:7.1f} {numbers['p95_ms']:7.1f} "
            f"{numbers['min_ms']:7.1f} {numbers['max_ms']:7.1f} "
            f"{numbers['p50_ms'] / ours['p50_ms']:9.2f} {numbers['p95_ms'] / ours['p95_ms']:9.2f}"
            f"  {commands[name]}"
        )
    print()
    for name, numbers in results.items():
        phases = ", ".join(f"{p} {ms:.1f}" for p, ms in numbers["median_ms_from_burst_to"].items())
        print(
            f"{name:10} median ms from the burst to: {phases}, first input {numbers['p50_ms']:.1f}"
        )


def print_verdicts(results: dict[str, Any]) -> None:
    ours, flanked, idle = results["ours"], results["flanked"], results["idle"]
    verdict = "meets" if ours["p50_ms"] <= TARGET_P50_MS else "misses"
    print(f"ours p50 {ours['p50_ms']:.1f} ms ({verdict} the target {TARGET_P50_MS:.0f} ms)")
    print(
        f"beside a flood of {FLOOD_INPUTS} inputs to another function: p50 "
        f"{flanked['p50_ms']:.1f} ms, p95 {flanked['p95_ms']:.1f} ms, "
        f"{flanked['p50_ms'] / ours['p50_ms']:.2f}x ours alone (p50)"
    )
    verdict = "meets" if idle["meets_target"] else "misses"
    print(
        f"idle node main process: {100 * idle['node_main_process_share']:.2f} % of a core "
        f"({verdict} the target {100 * TARGET_IDLE_SHARE:.0f} %); plain Celery node "
        f"{100 * idle['plain_node_main_process_share']:.2f} %, so the supervisor "
        f"{100 * idle['supervisor_share']:.2f} % ({idle['supervisor_turns_per_s'] or 0:.1f} "
        f"turns/s, {idle['supervisor_cpu_ms_per_turn'] or 0:.2f} CPU ms a turn)"
    )
    print(
        f"idle containers: {100 * idle['containers_share_total']:.2f} % of a core together "
        f"({', '.join(f'{100 * s:.2f} %' for s in idle['containers_share_each'])}); the "
        f"node's other children (fork server, pool, tracker) "
        f"{100 * idle['node_children_share']:.2f} %"
    )


def results_of(sides: list[Side], samples: list[Sample], idle: dict[str, Any]) -> dict[str, Any]:
    results = {s.name: summarize([x for x in samples if x.side == s.name]) for s in sides}
    ours = results["ours"]
    return {
        **results,
        "p50_ratio_to_ours": {n: r["p50_ms"] / ours["p50_ms"] for n, r in results.items()},
        "p95_ratio_to_ours": {n: r["p95_ms"] / ours["p95_ms"] for n, r in results.items()},
        "target_p50_ms": TARGET_P50_MS,
        "meets_target": ours["p50_ms"] <= TARGET_P50_MS,
        "idle": idle,
    }


def parameters(bench: Bench) -> dict[str, Any]:
    args = bench.args
    return {
        "rounds_per_side": args.rounds,
        "burst_inputs": args.burst,
        "pause_before_burst_s": f"uniform(0, {JITTER_SECONDS}), seed {args.seed}",
        "reaction": "time.monotonic() from just before the burst's first publish to the "
        "first input of the burst starting on a process that did not exist before it",
        "ours_function": bench.spec(OURS).as_dict(),
        "flanked_flood": {
            "function": bench.spec(FLOOD).as_dict(),
            "inputs": FLOOD_INPUTS,
            "seconds_per_input": bench.apps.FLOOD_SECONDS,
            "when": "published just before each burst of flanked; its backlog is "
            "dropped after the burst",
        },
        "autoscale": AUTOSCALE,
        "autoscale_keepalive_s": float(AUTOSCALE_KEEPALIVE),
        "poll_interval_s": DEFAULT_POLL_INTERVAL,
    }


def main(argv: list[str] | None = None) -> int:
    parser = options("reaction", __doc__)
    parser.add_argument("--rounds", type=int, default=20, help="bursts per side")
    parser.add_argument("--burst", type=int, default=10, help="inputs per burst")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step, at most")
    parser.add_argument("--seed", type=int, default=0, help="of the pauses before bursts")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    bench = Bench("reaction", parser, argv)
    args = bench.args
    with bench:
        sides: list[Side] = [cls(bench) for cls in (Ours, Flanked, Exec, Autoscale)]
        samples = run_rounds(sides, args)
        for side in sides:
            side.teardown()
        idle = measure_idle(bench, args.idle_seconds, args.baseline_seconds)
        params = parameters(bench)
    results = results_of(sides, samples, idle)
    commands = {side.name: side.command for side in sides}
    print_table({side.name: results[side.name] for side in sides}, commands)
    print_verdicts(results)
    samples_out = [asdict(sample) for sample in samples]
    bench.write(params, commands, results, samples=samples_out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
