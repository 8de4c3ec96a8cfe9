"""Cluster mode on three nodes: the burst against one node, and what leases cost Redis and CPU.

Run it with ``python -m benchmarks.bench_cluster`` from the repository root
(``--quick`` for a short smoke run, written to a temporary file).

Every node is ``celery -A benchmarks.apps worker -c 1 -n <name>@%h
--concurrent-functions F --concurrent-scope S``, on this machine, all on the
benchmark's private Redis (broker, result backend and, in cluster scope, the leases).
The inputs store their results (a Redis result backend is on, ``BENCH_RESULT_BACKEND``),
and the benchmark publishes them with ``apply_async`` during the run, then collects
them after it.

1. **Burst, three nodes against one.** 600 inputs of ``time.sleep(0.2)`` to a function
   with ``max_inputs=20``, ``max_containers=3`` and ``min_containers=0``
   (``benchmarks.apps.cluster_burst``), served by three nodes in cluster scope; the same
   function again (``cluster_burst_alone``) served by one node. Both sides have 60 slots
   over the cluster. Each burst finds no container (the last one's have retired,
   ``scaledown_window=1``). Reaction: from just before the first publish to the first
   input starting; wall: to the last input finishing (``time.time()`` stamped by the
   inputs, :func:`benchmarks.apps.record`). Rounds alternate which side goes first, after
   a warm-up round; the ratios are three nodes over one, of the medians.
2. **Redis calls under load.** The same burst on the three nodes alone, in cluster scope
   and then restarted with ``--concurrent-scope node`` (each node then holds the bound
   alone: up to nine containers). ``INFO commandstats`` and ``INFO cpu`` of the Redis are
   read just before the first publish and just after the last input finished. Redis
   counts the commands a script runs as well as the ``EVALSHA`` itself: "commands" are
   what Redis counted, the benchmark's own (its ``INFO`` and tally reads, the inputs'
   tally ``EVAL`` and what runs inside it) left out; ``EVALSHA`` calls are cluster mode's
   scripts (leases, the cluster's load, announcements, the sweep) and the containers'
   held-message renewal. One more burst runs under ``MONITOR`` to tell who sent what:
   each client connection is matched to its process (node, container, the benchmark)
   through ``/proc``, and each ``EVALSHA`` to its script by its SHA.
3. **Idle.** Three nodes serving ``cluster_idle`` (``min_containers=1``) with no inputs:
   in cluster scope one container over the three nodes, in node scope one per node.
   After the containers are up and have settled, a window of ``--idle-seconds``: each
   node's main process CPU (user + system, all its threads: the supervisor's, Celery's
   consumer), its containers' and its other children's (the fork server), as a share of
   one core, with ``INFO commandstats`` over the same window; then ``--monitor-seconds``
   under ``MONITOR`` for who sends what. Target: a node's main process within 2 % of a
   core in cluster scope.

Every process is stopped by its PID at the end of its phase, and on any exit
(:mod:`benchmarks.scenario`). The report (``results/cluster.json``) has every run and
window, and the machine's load average before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from benchmarks.common import JITTER_SECONDS, reset_tally, spread, wait_for_tally, wait_until
from benchmarks.scenario import APP, Bench, options, rotations, run_main, worker_command
from celery_concurrent import held_messages, leases
from devkit.processes import children, containers_of, cpu_seconds
from devkit.servers import stop_processes
from devkit.workers import STOP_GRACE

THREE = f"{APP}.cluster_burst"
ALONE = f"{APP}.cluster_burst_alone"
IDLE = f"{APP}.cluster_idle"
QUIET = ("-l", "WARNING", "--without-gossip", "--without-mingle")
#: a node's idle main process, at most (share of one core)
TARGET_IDLE_SHARE = 0.02
#: Redis commands a second per idle node above which the cost is unreasonable
IDLE_COMMANDS_PER_NODE_CEILING = 200.0
#: what the benchmark itself sends to read Redis: its INFO reads, the tally polls (MGET),
#: the PING that ends a MONITOR window
BENCH_READS = frozenset({"info", "mget", "ping", "monitor"})
#: :data:`benchmarks.apps.RESULT_BACKEND_FLAG` (the app is imported only once the broker
#: is known, by the harness)
RESULT_BACKEND_FLAG = "BENCH_RESULT_BACKEND"
#: how long a side's nodes get, once their containers are up, before an idle window
SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class Nodes:
    """A set of nodes: how many, their names, their scope and the function they serve."""

    name: str
    prefix: str
    count: int
    scope: str
    task: str

    def args(self, n: int | str) -> tuple[str, ...]:
        name = ("-n", f"{self.prefix}{n}@%h", "--concurrent-functions", self.task)
        return ("-c", "1", *name, "--concurrent-scope", self.scope, *QUIET)

    @property
    def command(self) -> str:
        return f"{self.count} x {worker_command(self.args('K'))}"


THREE_NODES = Nodes("3 nodes", "c", 3, "cluster", THREE)
ONE_NODE = Nodes("1 node", "s", 1, "cluster", ALONE)
THREE_NODE_SCOPE = Nodes("3 nodes, node scope", "n", 3, "node", THREE)
IDLE_SIDES = {
    "cluster": Nodes("idle, cluster scope", "i", 3, "cluster", IDLE),
    "node": Nodes("idle, node scope", "j", 3, "node", IDLE),
}


@contextlib.contextmanager
def running(bench: Bench, nodes: Nodes) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The nodes, started at once; stopped at once (a warm shutdown) when the block ends."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for n in range(1, nodes.count + 1):
            procs.append(bench.start(*nodes.args(n)))
        yield procs
    finally:
        stop_processes(procs, STOP_GRACE)
        for proc in procs:
            bench.workers.procs.remove(proc)


def container_count(procs: list[subprocess.Popen[bytes]]) -> int:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"node {proc.pid} exited ({proc.returncode})")
    return sum(len(containers_of(proc.pid)) for proc in procs)


# -- Redis: what it counted, and who sent it -------------------------------------------


@dataclass(frozen=True)
class Counters:
    """Redis' own counters at one moment: calls by command, and its CPU seconds."""

    at: float
    calls: dict[str, int]
    cpu_s: float

    @classmethod
    def read(cls, rds: redis.Redis) -> Counters:
        stats = rds.info("commandstats")
        cpu = rds.info("cpu")
        calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
        return cls(time.monotonic(), calls, cpu["used_cpu_user"] + cpu["used_cpu_sys"])

    def since(self, before: Counters) -> Window:
        calls = {
            name: n - before.calls.get(name, 0)
            for name, n in self.calls.items()
            if n > before.calls.get(name, 0)
        }
        return Window(self.at - before.at, calls, self.cpu_s - before.cpu_s)


@dataclass
class Window:
    """What Redis counted between two reads of its counters."""

    seconds: float
    calls: dict[str, int]
    cpu_s: float

    def add(self, other: Window) -> Window:
        calls = Counter(self.calls)
        calls.update(other.calls)
        return Window(self.seconds + other.seconds, dict(calls), self.cpu_s + other.cpu_s)

    def summary(self, nodes: int, inputs: int = 0) -> dict[str, Any]:
        """Per second (per node, per input), the benchmark's own commands left out (and,
        when inputs ran, their tally)."""
        own = self.own(inputs)
        theirs = {
            name: n - own.get(name, 0) for name, n in self.calls.items() if n > own.get(name, 0)
        }
        total, evalsha = sum(theirs.values()), theirs.get("evalsha", 0)
        per_input = (lambda n: n / inputs) if inputs else (lambda n: None)
        return {
            "seconds": self.seconds,
            "commands_per_s": total / self.seconds,
            "commands_per_s_per_node": total / self.seconds / nodes,
            "evalsha_per_s": evalsha / self.seconds,
            "evalsha_per_s_per_node": evalsha / self.seconds / nodes,
            "commands_per_input": per_input(total),
            "evalsha_per_input": per_input(evalsha),
            "redis_cpu_share": self.cpu_s / self.seconds,
            "by_command_per_s": {
                name: n / self.seconds for name, n in sorted(theirs.items(), key=lambda x: -x[1])
            },
            "benchmark_own_per_s": {name: n / self.seconds for name, n in own.items()},
        }

    def own(self, inputs: int) -> dict[str, int]:
        """The benchmark's reads, and when inputs ran, their tally
        (:func:`benchmarks.apps.record`): an EVAL an input, and inside it an INCRBY, two
        GETs and, for a new first or last, a SET. The result backend's GETs stay in;
        kombu's SETs of its ``unacked_mutex`` (one a node every 10 s) go with the tally's."""
        own = {name: n for name, n in self.calls.items() if name in BENCH_READS}
        if inputs:
            evals = self.calls.get("eval", 0)
            tally = {name: self.calls.get(name, 0) for name in ("eval", "incrby", "set")}
            own |= {**tally, "get": min(2 * evals, self.calls.get("get", 0))}
        return {name: n for name, n in own.items() if n}


def script_names() -> dict[str, str]:
    """Each script cluster mode runs, by the SHA that ``EVALSHA`` names it by."""
    bodies = {
        "lease acquire": leases._LUA_ACQUIRE,
        "lease renew": leases._LUA_RENEW,
        "lease release": leases._LUA_RELEASE,
        "leases live": leases._LUA_LIVE,
        "cluster load (every turn)": leases._LUA_LOADS,
        "announce": leases._LUA_ANNOUNCE,
        "held-message renewal": held_messages._LUA_RENEW,
        "orphan sweep": held_messages._LUA_ORPHANS,
    }
    return {
        hashlib.sha1((leases.LUA_NOW_MS + body).encode()).hexdigest(): name
        for name, body in bodies.items()
    }


def roles_of(procs: list[subprocess.Popen[bytes]]) -> dict[int, str]:
    """Who each process is: a node, a container, another child of a node, the benchmark."""
    found = {os.getpid(): "benchmark"}
    for proc in procs:
        found[proc.pid] = "node"
        found.update({child.pid: "fork server, pool" for child in children(proc.pid)})
        found.update({container.pid: "container" for container in containers_of(proc.pid)})
    return found


class CommandTally:
    """Every command Redis runs while the block lasts (``MONITOR``), by the process that
    sent it and, for a script, by its name; the commands inside scripts apart.

    Parameters
    ----------
    bench:
        The run, for its Redis.
    roles:
        Who each process is now (pid -> role); asked again when a new connection shows.
    """

    def __init__(self, bench: Bench, roles: Callable[[], dict[int, str]]) -> None:
        self.bench = bench
        self.roles = roles
        self.port = bench.server.port
        self.scripts = script_names()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.script_calls: Counter[tuple[str, str]] = Counter()
        self.inside: Counter[str] = Counter()
        self.seconds = 0.0
        self._clients: dict[int, str] = {}
        self._looked_up = 0.0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self) -> CommandTally:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.bench.rds.ping()  # the reader wakes on this command and sees the flag
        self._thread.join(10)

    def _run(self) -> None:
        client = redis.Redis.from_url(self.bench.server.url)
        current = "other"
        try:
            with client.monitor() as monitor:
                began = time.monotonic()
                self._ready.set()
                while not self._stop.is_set():
                    seen = monitor.next_command()
                    if seen["client_type"] == "lua":
                        self.inside[current] += 1
                        continue
                    name, _, rest = seen["command"].partition(" ")
                    name = name.lower()
                    role = self._role(int(seen["client_port"] or 0))
                    self.calls[(role, name)] += 1
                    if name == "evalsha":
                        current = self.script(rest)
                        self.script_calls[(role, current)] += 1
                    elif name == "eval":
                        current = "benchmark tally (EVAL)"
                self.seconds = time.monotonic() - began
        finally:
            client.close()

    def script(self, arguments: str) -> str:
        """The name of the script an ``EVALSHA`` runs, else its first key (kombu's
        ``unacked_mutex`` is a redis-py lock, released by a script)."""
        sha, _, rest = arguments.partition(" ")
        if sha in self.scripts:
            return self.scripts[sha]
        keys = rest.split(" ")
        return f"other script ({keys[1] if len(keys) > 1 else 'no key'})"

    def _role(self, port: int) -> str:
        if port not in self._clients and time.monotonic() - self._looked_up > 0.2:
            self._looked_up = time.monotonic()
            roles = self.roles()
            for conn in psutil.net_connections("tcp"):
                if conn.raddr and conn.raddr.port == self.port and conn.pid in roles:
                    self._clients[conn.laddr.port] = roles[conn.pid]
        return self._clients.get(port, "connection gone before it was looked up")

    def summary(self, nodes: int, inputs: int = 0) -> dict[str, Any]:
        """Client calls per second (per node, per input) by process and command; scripts
        by name, and the commands each runs inside."""
        seconds = self.seconds or 1.0
        theirs = {
            (role, name): n
            for (role, name), n in self.calls.items()
            if not (role == "benchmark" and name in BENCH_READS) and name != "eval"
        }
        by_process: dict[str, dict[str, float]] = {}
        for (role, name), n in sorted(theirs.items(), key=lambda x: -x[1]):
            by_process.setdefault(role, {})[name] = n / seconds
        scripts = Counter[str]()
        for (_, script), n in self.script_calls.items():
            scripts[script] += n
        total = sum(theirs.values())
        ours = sum(n for name, n in scripts.items() if name in self.scripts.values())
        return {
            "seconds": self.seconds,
            # EVALSHA of cluster mode's scripts and the held-message renewal; the rest of
            # the EVALSHA calls are kombu's (its bindings, its unacked_mutex lock)
            "cluster_mode_scripts_per_s": ours / seconds,
            "cluster_mode_scripts_per_s_per_node": ours / seconds / nodes,
            "cluster_mode_scripts_per_input": ours / inputs if inputs else None,
            "client_calls_per_s": total / seconds,
            "client_calls_per_s_per_node": total / seconds / nodes,
            "client_calls_per_input": total / inputs if inputs else None,
            "by_process_per_s": by_process,
            "scripts_per_s": {name: n / seconds for name, n in scripts.most_common()},
            "commands_inside_per_call": {
                name: self.inside[name] / n for name, n in scripts.items() if n
            },
            "commands_inside_scripts_per_s": sum(
                n for name, n in self.inside.items() if not name.startswith("benchmark")
            )
            / seconds,
        }


# -- a burst ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    side: str
    round: int
    inputs: int
    #: from just before the first publish to the first input starting
    reaction_s: float
    #: ... to the last input finishing
    wall_s: float
    #: how long publishing took
    publish_s: float
    load_1m: float
    redis: dict[str, Any] = field(default_factory=dict)


def burst(
    bench: Bench, nodes: Nodes, procs: list[subprocess.Popen[bytes]], round_no: int, pause: float
) -> tuple[Run, Window]:
    """One burst from zero containers; its figures and what Redis counted meanwhile."""
    args, rds = bench.args, bench.rds
    wait_until(lambda: not container_count(procs), args.timeout, f"{nodes.name}: cold")
    time.sleep(pause)  # a burst lands anywhere in the supervisors' polls, as a real one does
    key = f"bench:cluster:{nodes.prefix}:{round_no}"
    reset_tally(rds, key)
    task = bench.app.tasks[nodes.task]
    before = Counters.read(rds)
    with bench.app.producer_or_acquire() as producer:
        began = time.time()
        results = [
            task.apply_async((key, args.inputs, args.seconds), producer=producer)
            for _ in range(args.inputs)
        ]
        published = time.time() - began
    try:
        tally = wait_for_tally(rds, key, args.inputs, args.timeout)
    except TimeoutError as exc:
        raise RuntimeError(f"{nodes.name}: {exc}\n{bench.workers.tail(procs[0])}") from exc
    window = Counters.read(rds).since(before)
    # every result is stored by now; reading them also ends the publisher's subscriptions
    bench.app.ResultSet(results).join(timeout=args.timeout)
    run = Run(
        nodes.name,
        round_no,
        args.inputs,
        tally.first_start - began,
        tally.last_finish - began,
        published,
        os.getloadavg()[0],
        window.summary(nodes.count, args.inputs),
    )
    return run, window


def print_run(run: Run, label: str) -> None:
    print(
        f"{label:8} {run.side:20} reaction {1000 * run.reaction_s:6.0f} ms, wall "
        f"{run.wall_s:5.2f} s (published in {run.publish_s:.2f} s; load {run.load_1m:.2f})",
        flush=True,
    )


def burst_rounds(bench: Bench, sides: dict[str, list[subprocess.Popen[bytes]]]) -> list[Run]:
    """The timed bursts of three nodes and one, alternating; a warm-up round first."""
    jitter = random.Random(bench.args.seed)
    runs = []
    for round_no, side in rotations([THREE_NODES, ONE_NODE], bench.args.rounds, warm_up=True):
        run, _ = burst(bench, side, sides[side.name], round_no, jitter.uniform(0, JITTER_SECONDS))
        if round_no >= 0:
            runs.append(run)
            print_run(run, f"round {round_no + 1}")
    return runs


def load_traffic(
    bench: Bench, nodes: Nodes, procs: list[subprocess.Popen[bytes]], warm_up: bool
) -> tuple[dict[str, Any], list[Run]]:
    """Redis' counts over ``--load-rounds`` bursts on ``nodes`` alone, then who sent what
    over one more burst under MONITOR."""
    args = bench.args
    if warm_up:
        burst(bench, nodes, procs, -1, 0.0)
    runs, total = [], Window(0.0, {}, 0.0)
    for round_no in range(args.load_rounds):
        run, window = burst(bench, nodes, procs, round_no, 0.0)
        runs.append(run)
        total = total.add(window)
        print_run(run, "load")
    with CommandTally(bench, lambda: roles_of(procs)) as tally:
        run, _ = burst(bench, nodes, procs, args.load_rounds, 0.0)
    print_run(run, "MONITOR")
    inputs = args.inputs * args.load_rounds
    found = {
        "nodes": nodes.count,
        "scope": nodes.scope,
        "runs": len(runs),
        "wall_s": spread([run.wall_s for run in runs]),
        "counted": total.summary(nodes.count, inputs),
        "monitor": tally.summary(nodes.count, args.inputs),
    }
    return found, runs


# -- idle ------------------------------------------------------------------------------


def cpu_of(pids: list[int], threads: list[tuple[int, int]]) -> dict[Any, float]:
    """CPU seconds of each process (by pid) and thread (by ``(pid, tid)``) still there."""
    found: dict[Any, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = cpu_seconds(pid)
    for pid, tid in threads:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            found[(pid, tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def threads_of(pid: int) -> list[tuple[int, int]]:
    try:
        return [(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def idle_cost(bench: Bench, nodes: Nodes) -> dict[str, Any]:
    """The idle nodes' CPU and Redis' counts over one window, then MONITOR over another."""
    args = bench.args
    warm = 1 if nodes.scope == "cluster" else nodes.count  # keep_warm=1: cluster or node
    with running(bench, nodes) as procs:
        wait_until(lambda: container_count(procs) == warm, 90, f"{nodes.name}: warm")
        time.sleep(SETTLE_SECONDS)
        groups = {
            proc.pid: {
                "containers": [p.pid for p in containers_of(proc.pid)],
                "others": [p.pid for p in children(proc.pid)],
            }
            for proc in procs
        }
        watched = [pid for node, g in groups.items() for pid in [node, *sum(g.values(), [])]]
        threads = [thread for proc in procs for thread in threads_of(proc.pid)]
        before_cpu, before = cpu_of(watched, threads), Counters.read(bench.rds)
        time.sleep(args.idle_seconds)
        after_cpu, window = cpu_of(watched, threads), Counters.read(bench.rds).since(before)
        with CommandTally(bench, lambda: roles_of(procs)) as tally:
            time.sleep(args.monitor_seconds)

    def share(keys: list[Any]) -> float:
        used = [after_cpu[k] - before_cpu[k] for k in keys if k in after_cpu and k in before_cpu]
        return sum(used) / window.seconds

    per_node: list[dict[str, Any]] = []
    for node, group in groups.items():
        others = [share([t]) for t in threads if t[0] == node and t[1] != node]
        per_node.append(
            {
                "main_process_share": share([node]),
                # the main thread runs Celery's consumer; the busiest other one is, at
                # idle, the supervisor's (Python's thread names do not reach /proc)
                "main_thread_share": share([(node, node)]),
                "other_threads_top_shares": sorted(others, reverse=True)[:3],
                "threads": len(others) + 1,
                "containers": len(group["containers"]),
                "containers_share": share(group["containers"]),
                "fork_server_and_pool_share": share(group["others"]),
            }
        )
    mains = [node["main_process_share"] for node in per_node]
    return {
        "nodes": nodes.count,
        "scope": nodes.scope,
        "seconds": window.seconds,
        "main_process_share": spread(mains),
        "node_with_containers_share": spread(
            [n["main_process_share"] + n["containers_share"] for n in per_node]
        ),
        "per_node": per_node,
        "counted": window.summary(nodes.count),
        "monitor": tally.summary(nodes.count),
        "command": nodes.command,
    }


# -- report ----------------------------------------------------------------------------


def burst_results(runs: list[Run], params: dict[str, Any]) -> dict[str, Any]:
    sides: dict[str, dict[str, Any]] = {}
    for side in (THREE_NODES, ONE_NODE):
        mine = [run for run in runs if run.side == side.name]
        sides[side.name] = {
            "reaction_s": spread([run.reaction_s for run in mine]),
            "wall_s": spread([run.wall_s for run in mine]),
            "publish_s": spread([run.publish_s for run in mine]),
            "runs": len(mine),
        }
    three, one = sides[THREE_NODES.name], sides[ONE_NODE.name]
    slots = params["function"]["max_inputs"] * params["function"]["max_containers"]
    return {
        **sides,
        "ratio_3_over_1": {
            "reaction": three["reaction_s"]["median"] / one["reaction_s"]["median"],
            "wall": three["wall_s"]["median"] / one["wall_s"]["median"],
        },
        "ideal_s_without_cold_start": math.ceil(params["inputs"] / slots) * params["seconds"],
    }


def results_of(
    runs: list[Run], load: dict[str, Any], idle: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    cluster, node = idle["cluster"], idle["node"]
    worst = cluster["main_process_share"]["max"]
    commands = cluster["counted"]["commands_per_s_per_node"]
    return {
        "burst": burst_results(runs, params),
        "load": load,
        "idle": idle,
        "idle_cost_of_cluster_mode": {
            "main_process_share": cluster["main_process_share"]["median"]
            - node["main_process_share"]["median"],
            "commands_per_s_per_node": commands - node["counted"]["commands_per_s_per_node"],
            "client_calls_per_s_per_node": cluster["monitor"]["client_calls_per_s_per_node"]
            - node["monitor"]["client_calls_per_s_per_node"],
            "cluster_mode_scripts_per_s_per_node": cluster["monitor"][
                "cluster_mode_scripts_per_s_per_node"
            ],
        },
        "target_idle_share": TARGET_IDLE_SHARE,
        "meets_idle_target": worst <= TARGET_IDLE_SHARE,
        "idle_commands_ceiling_per_node": IDLE_COMMANDS_PER_NODE_CEILING,
        "idle_commands_within_ceiling": commands <= IDLE_COMMANDS_PER_NODE_CEILING,
    }


def pct(share: float) -> str:
    return f"{100 * share:.2f} %"


def top(per_s: dict[str, float], n: int = 6) -> str:
    return ", ".join(f"{name} {rate:.1f}" for name, rate in list(per_s.items())[:n])


def print_report(results: dict[str, Any], params: dict[str, Any]) -> None:
    found = results["burst"]
    print(
        f"\nburst: {params['inputs']} x sleep({params['seconds']:g}), max_inputs "
        f"{params['function']['max_inputs']}, max_containers "
        f"{params['function']['max_containers']} (ideal {found['ideal_s_without_cold_start']:.2f}"
        " s + the cold start)"
    )
    print(f"{'side':8} {'reaction ms (min-max)':>24} {'wall s (min-max)':>20} {'publish s':>10}")
    for name in (THREE_NODES.name, ONE_NODE.name):
        side = found[name]
        reaction, wall = side["reaction_s"], side["wall_s"]
        print(
            f"{name:8} {1000 * reaction['median']:8.0f} ({1000 * reaction['min']:.0f}-"
            f"{1000 * reaction['max']:.0f}){'':6} {wall['median']:6.2f} ({wall['min']:.2f}-"
            f"{wall['max']:.2f}){'':3} {side['publish_s']['median']:8.2f}"
        )
    ratio = found["ratio_3_over_1"]
    print(f"3 nodes / 1 node: reaction {ratio['reaction']:.2f}x, wall {ratio['wall']:.2f}x")
    print("\nRedis under load (per input; commands as Redis counts them, scripts' inside too)")
    for scope, load in results["load"].items():
        counted, seen = load["counted"], load["monitor"]
        print(
            f"  {scope:7} scope, {load['nodes']} nodes, wall {load['wall_s']['median']:.2f} s: "
            f"{counted['commands_per_input']:.1f} commands/input, "
            f"{counted['evalsha_per_input']:.2f} EVALSHA/input (cluster mode's scripts "
            f"{seen['cluster_mode_scripts_per_s']:.0f}/s), "
            f"{counted['commands_per_s']:.0f} commands/s, client calls "
            f"{seen['client_calls_per_input']:.1f}/input; "
            f"Redis CPU {pct(counted['redis_cpu_share'])}"
        )
        print(f"          scripts/s: {top(seen['scripts_per_s'])}")
    print("\nidle (3 nodes, keep_warm=1; per node)")
    for scope, idle in results["idle"].items():
        counted, seen = idle["counted"], idle["monitor"]
        mains = ", ".join(
            f"{pct(node['main_process_share'])} (main thread {pct(node['main_thread_share'])}, "
            f"busiest other {pct(node['other_threads_top_shares'][0])})"
            for node in idle["per_node"]
        )
        print(
            f"  {scope:7} scope: main process {mains}; containers "
            f"{', '.join(pct(n['containers_share']) for n in idle['per_node'] if n['containers'])}"
            f"; Redis {counted['commands_per_s_per_node']:.1f} commands/s per node "
            f"({seen['client_calls_per_s_per_node']:.1f} client calls), EVALSHA "
            f"{counted['evalsha_per_s_per_node']:.1f}/s per node (cluster mode's "
            f"{seen['cluster_mode_scripts_per_s_per_node']:.1f}), Redis CPU "
            f"{pct(counted['redis_cpu_share'])}"
        )
        for role, per_s in seen["by_process_per_s"].items():
            print(f"          {role}: {top(per_s)} (calls/s, all nodes)")
        if seen["scripts_per_s"]:
            print(f"          scripts/s: {top(seen['scripts_per_s'])}")
    cost = results["idle_cost_of_cluster_mode"]
    verdict = "meets" if results["meets_idle_target"] else "MISSES"
    print(
        f"cluster mode at idle costs a node {pct(cost['main_process_share'])} of a core (main "
        f"process, median) and {cost['commands_per_s_per_node']:.1f} Redis commands/s "
        f"({cost['client_calls_per_s_per_node']:.1f} client calls/s); the busiest node's main "
        f"process {pct(results['idle']['cluster']['main_process_share']['max'])} {verdict} the "
        f"target {pct(TARGET_IDLE_SHARE)}"
    )


def parameters(bench: Bench) -> dict[str, Any]:
    args = bench.args
    return {
        "inputs": args.inputs,
        "seconds": args.seconds,
        "rounds_per_side": args.rounds,
        "load_rounds": args.load_rounds,
        "idle_seconds": args.idle_seconds,
        "monitor_seconds": args.monitor_seconds,
        "function": bench.spec(THREE).as_dict(),
        "idle_function": bench.spec(IDLE).as_dict(),
        "result_backend": "redis (the broker's Redis)",
        "reaction": "time.time() just before the first apply_async to the first input start",
        "wall": "... to the last input finishing",
        "commands": "INFO commandstats deltas, commands run inside scripts included, the "
        f"benchmark's reads ({', '.join(sorted(BENCH_READS))}) left out, and in a run "
        "with inputs their tally (every EVAL, INCRBY and SET, two GETs an EVAL)",
        "client_calls": "MONITOR: the commands clients sent (EVALSHA once), by process",
    }


def main(argv: list[str] | None = None) -> int:
    parser = options("cluster", __doc__)
    parser.add_argument("--rounds", type=int, default=5, help="timed bursts per side")
    parser.add_argument("--inputs", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=0.2, help="each input's sleep")
    parser.add_argument("--load-rounds", type=int, default=2, help="bursts per scope, counted")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--monitor-seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per step, at most")
    parser.add_argument("--seed", type=int, default=0, help="of the pauses before bursts")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    os.environ[RESULT_BACKEND_FLAG] = "1"  # before the harness imports the app
    bench = Bench("cluster", parser, argv)
    if bench.args.quick:
        quick(bench)
    with bench:
        with running(bench, THREE_NODES) as three:
            with running(bench, ONE_NODE) as one:
                runs = burst_rounds(bench, {THREE_NODES.name: three, ONE_NODE.name: one})
            load = {"cluster": load_traffic(bench, THREE_NODES, three, warm_up=False)}
        with running(bench, THREE_NODE_SCOPE) as procs:
            load["node"] = load_traffic(bench, THREE_NODE_SCOPE, procs, warm_up=True)
        idle = {scope: idle_cost(bench, nodes) for scope, nodes in IDLE_SIDES.items()}
        params = parameters(bench)
    results = results_of(runs, {k: v[0] for k, v in load.items()}, idle, params)
    print_report(results, params)
    workers = {nodes.name: nodes.command for nodes in (THREE_NODES, ONE_NODE, THREE_NODE_SCOPE)}
    workers |= {nodes.name: nodes.command for nodes in IDLE_SIDES.values()}
    load_runs = [asdict(run) for _, found in load.values() for run in found]
    bench.write(params, workers, results, runs=[asdict(run) for run in runs], load_runs=load_runs)
    return 0


def quick(bench: Bench) -> None:
    """A smoke run: one round, fewer inputs, short windows, written to a temporary file
    unless ``--output`` says where."""
    args = bench.args
    args.rounds, args.inputs, args.load_rounds = 1, 120, 1
    args.idle_seconds, args.monitor_seconds = 4.0, 2.0
    if not any(arg.startswith("--output") for arg in bench.argv):
        args.output = Path(tempfile.gettempdir()) / "cluster-quick.json"


if __name__ == "__main__":
    sys.exit(run_main(main))
