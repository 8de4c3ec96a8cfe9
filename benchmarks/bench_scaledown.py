"""Scenario 5, scale-down precision, and the scaling plot (``results/scaling.png``).

Run it with ``python -m benchmarks.bench_scaledown`` from the repository root.

A node, ``celery -A benchmarks.apps worker -c 1 --concurrent-functions
benchmarks.apps.scaledown_ours --concurrent-metrics-port PORT``, supervises a function
with ``max_inputs=10``, ``max_containers=4``, ``min_containers=1`` (``keep_warm``) and
``scaledown_window=2`` (``container_idle_timeout``). Each round starts from the steady
state (one idle container), sends a burst of ``--burst`` inputs of ``sleep(0.5)``,
which scales the function to four containers, and waits until it is back to one.

- **Precision.** Every input notes which process finished it, and when. The benchmark
  polls the fork server's children every 10 ms and notes when each container's process
  is gone. For each container that retired, the delay is its exit minus the last finish
  of an input on it; the target is ``delay <= scaledown_window + 1 s``. The delay is
  the idle window itself, then the supervisor's next turn (it polls every 50 ms) and
  Celery's warm shutdown of the container.
- **keep_warm.** Through every round the node's ``celery_concurrent_containers`` gauge
  (running containers, draining ones left out) is read every 100 ms, and the number of
  container processes every 10 ms. ``keep_warm`` holds if neither ever fell below
  ``min_containers``.
- **The plot.** The first round sends a larger burst (``--plot-burst``) and its samples
  of the gauges (containers, backlog, in flight) draw ``results/scaling.png``: the
  burst, the idle window, the scale-down.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.bench_overhead import python_path, spread
from benchmarks.bench_reaction import wait_until
from benchmarks.common import POLL_SECONDS, environment, publish, run_main, scrape
from celery_concurrent import spec_of
from tests.support import RedisServer, Workers, containers_of, free_port

APP = "benchmarks.apps"
OURS = f"{APP}.scaledown_ours"
RESULTS = Path(__file__).resolve().parent / "results" / "scaledown.json"
PLOT = Path(__file__).resolve().parent / "results" / "scaling.png"
#: a container must exit within the window plus this
TARGET_SLACK_S = 1.0
SCRAPE_SECONDS = 0.1
INPUT_SECONDS = 0.5
#: the node's plot shows this much steady state before the burst and after scale-down
MARGIN_SECONDS = 1.0


@dataclass
class Trace:
    """What one round saw, in seconds from its burst."""

    #: (t, containers, backlog, in flight) from the metrics endpoint
    gauges: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: (t, container processes, draining ones included) from the fork server
    processes: list[tuple[float, int]] = field(default_factory=list)
    #: pid -> when its process was first seen gone
    exits: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Retirement:
    round: int
    pid: int
    #: from the last input finishing on it to its process's exit
    delay_s: float
    overshoot_s: float


def living(node_pid: int) -> set[int]:
    return {child.pid for child in containers_of(node_pid)}


def steady(port: int, node_pid: int, keep_warm: int) -> bool:
    gauges = scrape(port, OURS)
    return (
        gauges.get("containers") == keep_warm
        and gauges.get("in_flight") == 0
        and gauges.get("backlog") == 0
        and len(living(node_pid)) == keep_warm
    )


def run_round(
    app: Any, rds: redis.Redis, node: Any, port: int, spec: Any, size: int, timeout: float
) -> tuple[Trace, dict[int, float]]:
    """One burst and its scale-down; returns the trace and each pid's last finish."""
    key = f"bench:scaledown:{time.monotonic()}"
    trace = Trace()
    seen: set[int] = set()
    began = time.monotonic()
    burst_at = began + MARGIN_SECONDS
    sent = False
    last_scrape = 0.0
    deadline = began + timeout
    done_at: float | None = None
    while True:
        now = time.monotonic()
        if not sent and now >= burst_at:
            publish(app, OURS, (key, INPUT_SECONDS), size, spec.queue)
            burst_at, sent = time.monotonic(), True
        alive = living(node.pid)
        t = time.monotonic() - burst_at
        for pid in seen - alive:
            trace.exits.setdefault(pid, t)
        seen |= alive
        trace.processes.append((t, len(alive)))
        if now - last_scrape >= SCRAPE_SECONDS:
            last_scrape = now
            g = scrape(port, OURS)
            trace.gauges.append((t, g["containers"], g["backlog"], g["in_flight"]))
            finished = sent and rds.llen(key) >= size
            keep_warm = spec.min_containers
            if finished and g["containers"] == keep_warm and len(alive) == keep_warm:
                done_at = done_at or now
                if now - done_at >= MARGIN_SECONDS:
                    break
        if node.poll() is not None:
            raise RuntimeError(f"the node exited ({node.returncode})")
        if now > deadline:
            raise TimeoutError(f"scale-down: not back to keep_warm within {timeout}s")
        time.sleep(POLL_SECONDS)
    last_finish: dict[int, float] = {}
    for raw in rds.lrange(key, 0, -1):
        pid, finished_at = json.loads(raw)
        last_finish[pid] = max(last_finish.get(pid, 0.0), finished_at)
    # finish stamps are wall-clock; the trace is relative to the burst's monotonic time
    offset = time.time() - time.monotonic() + burst_at
    return trace, {pid: at - offset for pid, at in last_finish.items()}


def retirements(
    round_no: int, trace: Trace, last_finish: dict[int, float], window: float
) -> list[Retirement]:
    found = []
    for pid, exit_at in sorted(trace.exits.items()):
        if pid not in last_finish:
            continue  # a container that never ran an input: no "last input" to time from
        delay = exit_at - last_finish[pid]
        found.append(Retirement(round_no, pid, delay, delay - window))
    return found


def keep_warm_held(trace: Trace, keep_warm: int) -> dict[str, Any]:
    containers = [c for _, c, _, _ in trace.gauges]
    processes = [n for _, n in trace.processes]
    return {
        "min_containers_gauge": min(containers),
        "min_container_processes": min(processes),
        "samples_gauge": len(containers),
        "samples_processes": len(processes),
        "held": min(containers) >= keep_warm and min(processes) >= keep_warm,
    }


def plot(trace: Trace, last_finish: dict[int, float], spec: Any, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t for t, *_ in trace.gauges]
    fig, left = plt.subplots(figsize=(9, 4.5), dpi=120)
    right = left.twinx()
    right.fill_between(
        times,
        [b for _, _, b, _ in trace.gauges],
        step="post",
        color="tab:orange",
        alpha=0.25,
        label="backlog (inputs waiting)",
    )
    right.step(
        times,
        [f for *_, f in trace.gauges],
        where="post",
        color="tab:green",
        lw=1,
        label="in flight",
    )
    left.step(
        times,
        [c for _, c, _, _ in trace.gauges],
        where="post",
        color="tab:blue",
        lw=2.5,
        label="containers (running)",
    )
    left.step(
        [t for t, _ in trace.processes],
        [n for _, n in trace.processes],
        where="post",
        color="tab:blue",
        lw=1,
        ls=":",
        label="container processes (draining too)",
    )
    left.axhline(spec.min_containers, color="grey", ls="--", lw=1)
    left.text(times[0], spec.min_containers + 0.05, " keep_warm", color="grey", va="bottom")
    idle_from = max(last_finish.values())
    left.axvspan(
        idle_from,
        idle_from + spec.scaledown_window,
        color="grey",
        alpha=0.12,
        label=f"container_idle_timeout ({spec.scaledown_window:g} s) after the last input",
    )
    left.axvline(0, color="black", lw=0.8)
    left.text(0, spec.max_containers + 0.25, f" burst: {size} inputs", va="bottom")
    left.set_xlabel("seconds from the burst")
    left.set_ylabel("containers")
    right.set_ylabel("inputs")
    left.set_ylim(0, spec.max_containers + 1)
    right.set_ylim(0, max(size, 1) * 1.1)
    left.set_zorder(right.get_zorder() + 1)
    left.patch.set_visible(False)
    handles = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)
    left.set_title(
        f"{spec.name}: max_inputs={spec.max_inputs}, concurrency_limit={spec.max_containers}, "
        f"keep_warm={spec.min_containers}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="bursts, the plotted one included")
    parser.add_argument("--burst", type=int, default=40, help="inputs per burst")
    parser.add_argument("--plot-burst", type=int, default=300, help="inputs of the first burst")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per round, at most")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    extra_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(extra_args)

    load_before = os.getloadavg()
    began = time.monotonic()
    found: list[Retirement] = []
    warm: list[dict[str, Any]] = []
    plotted: dict[str, Any] = {}
    server = RedisServer()
    try:
        server.start()
        # The app reads its broker when imported, so point it at the private Redis first.
        os.environ["CELERY_BROKER_URL"] = server.url
        app = importlib.import_module(APP).app
        spec = spec_of(app.tasks[OURS])
        assert spec is not None
        rds = redis.Redis.from_url(server.url)
        port = free_port()
        node_args = (
            *("-c", "1", "-l", "WARNING", "-n", "scaledown@%h"),
            *("--concurrent-functions", OURS, "--concurrent-metrics-port", str(port)),
        )
        with tempfile.TemporaryDirectory(prefix="cc-bench-") as logdir:
            workers = Workers(server.url, Path(logdir))
            try:
                node = workers.start(APP, *node_args, wait_ready=False)
                for round_no in range(args.rounds):
                    wait_until(
                        lambda: _steady_or_not_up(port, node.pid, spec.min_containers),
                        args.timeout,
                        "the node: steady at keep_warm",
                        node,
                    )
                    size = args.plot_burst if round_no == 0 else args.burst
                    trace, last_finish = run_round(app, rds, node, port, spec, size, args.timeout)
                    mine = retirements(round_no, trace, last_finish, spec.scaledown_window)
                    found += mine
                    warm.append({"round": round_no, **keep_warm_held(trace, spec.min_containers)})
                    delays = ", ".join(f"{r.delay_s:.2f}" for r in mine)
                    print(
                        f"round {round_no + 1}: {size} inputs; containers exited {delays} s "
                        f"after their last input (window {spec.scaledown_window:g} s); "
                        f"fewest running {warm[-1]['min_containers_gauge']:.0f} "
                        f"(load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                    if round_no == 0:
                        plot(trace, last_finish, spec, size, args.plot)
                        plotted = {"trace": asdict(trace), "burst": size}
            finally:
                workers.stop_all()
    finally:
        server.stop()
    elapsed = time.monotonic() - began

    delays = [r.delay_s for r in found]
    worst = max(delays)
    limit = spec.scaledown_window + TARGET_SLACK_S
    held = all(w["held"] for w in warm)
    results = {
        "delay_s": spread(delays),
        "overshoot_s": spread([r.overshoot_s for r in found]),
        "mean_overshoot_s": statistics.fmean(r.overshoot_s for r in found),
        "retirements": len(found),
        "scaledown_window_s": spec.scaledown_window,
        "target_delay_s": limit,
        "meets_target": worst <= limit,
        "keep_warm": spec.min_containers,
        "keep_warm_held": held,
        "keep_warm_rounds": warm,
    }
    print()
    print(
        f"delay from the last input to the container's exit: median {statistics.median(delays):.2f}"
        f" s, min {min(delays):.2f}, max {worst:.2f} over {len(found)} retirements; window "
        f"{spec.scaledown_window:g} s, target <= {limit:g} s "
        f"({'meets' if worst <= limit else 'misses'})"
    )
    print(
        f"keep_warm={spec.min_containers}: {'never violated' if held else 'VIOLATED'} "
        f"(fewest running {min(w['min_containers_gauge'] for w in warm):.0f}, fewest processes "
        f"{min(w['min_container_processes'] for w in warm)})"
    )
    print(f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")

    report = {
        "benchmark": "scaledown",
        "command": " ".join([python_path(), "-m", "benchmarks.bench_scaledown", *extra_args]),
        "parameters": {
            "rounds": args.rounds,
            "burst_inputs": args.burst,
            "plot_burst_inputs": args.plot_burst,
            "seconds_per_input": INPUT_SECONDS,
            "ours_function": spec.as_dict(),
            "delay": "a container's process exit (polled every 10 ms) minus the last finish "
            "of an input on it",
            "keep_warm": "the containers gauge every 100 ms and the container processes every "
            "10 ms never below min_containers",
        },
        "workers": {"node": " ".join(("celery -A", APP, "worker", *node_args))},
        "results": results,
        "retirements": [asdict(r) for r in found],
        "plot": {"path": str(args.plot), **plotted},
        "environment": environment(load_before, os.getloadavg(), elapsed),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} and {args.plot}")
    return 0


def _steady_or_not_up(port: int, node_pid: int, keep_warm: int) -> bool:
    try:
        return steady(port, node_pid, keep_warm)
    except OSError:
        return False  # the metrics endpoint is not up yet


if __name__ == "__main__":
    sys.exit(run_main(main))
