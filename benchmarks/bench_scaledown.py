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
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import POLL_SECONDS, publish, scrape, spread, wait_until
from benchmarks.scenario import APP, RESULTS, Bench, options, run_main, worker_command
from devkit.processes import containers_of
from devkit.servers import free_port

OURS = f"{APP}.scaledown_ours"
PLOT = RESULTS / "scaling.png"
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
    bench: Bench, node: Any, port: int, spec: Any, size: int, timeout: float
) -> tuple[Trace, dict[int, float]]:
    """One burst and its scale-down; returns the trace and each pid's last finish."""
    app, rds = bench.app, bench.rds
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

    fig, left = plt.subplots(figsize=(9, 4.5), dpi=120)
    right = left.twinx()
    _draw_series(left, right, trace)
    times = [t for t, *_ in trace.gauges]
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


def _draw_series(left: Any, right: Any, trace: Trace) -> None:
    """The gauges on two axes: containers on the left, inputs on the right."""
    times = [t for t, *_ in trace.gauges]
    backlog = [b for _, _, b, _ in trace.gauges]
    right.fill_between(
        times,
        backlog,
        step="post",
        color="tab:orange",
        alpha=0.25,
        label="backlog (inputs waiting)",
    )
    in_flight = [f for *_, f in trace.gauges]
    right.step(times, in_flight, where="post", color="tab:green", lw=1, label="in flight")
    containers = [c for _, c, _, _ in trace.gauges]
    left.step(
        times, containers, where="post", color="tab:blue", lw=2.5, label="containers (running)"
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


def run_rounds(
    bench: Bench, args: argparse.Namespace, node_args: tuple[str, ...], port: int
) -> dict[str, Any]:
    """Every round from the steady state: its retirements, whether keep_warm held, and
    the first round's trace (plotted)."""
    spec = bench.spec(OURS)
    found: list[Retirement] = []
    warm: list[dict[str, Any]] = []
    plotted: dict[str, Any] = {}
    node = bench.start(*node_args)
    for round_no in range(args.rounds):
        wait_until(
            lambda: _steady_or_not_up(port, node.pid, spec.min_containers),
            args.timeout,
            "the node: steady at keep_warm",
            node,
        )
        size = args.plot_burst if round_no == 0 else args.burst
        trace, last_finish = run_round(bench, node, port, spec, size, args.timeout)
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
    return {"retirements": found, "warm": warm, "plotted": plotted}


def results_of(found: list[Retirement], warm: list[dict[str, Any]], spec: Any) -> dict[str, Any]:
    delays = [r.delay_s for r in found]
    limit = spec.scaledown_window + TARGET_SLACK_S
    return {
        "delay_s": spread(delays),
        "overshoot_s": spread([r.overshoot_s for r in found]),
        "mean_overshoot_s": statistics.fmean(r.overshoot_s for r in found),
        "retirements": len(found),
        "scaledown_window_s": spec.scaledown_window,
        "target_delay_s": limit,
        "meets_target": max(delays) <= limit,
        "keep_warm": spec.min_containers,
        "keep_warm_held": all(w["held"] for w in warm),
        "keep_warm_rounds": warm,
    }


def print_summary(results: dict[str, Any]) -> None:
    delay, warm = results["delay_s"], results["keep_warm_rounds"]
    print()
    print(
        f"delay from the last input to the container's exit: median {delay['median']:.2f}"
        f" s, min {delay['min']:.2f}, max {delay['max']:.2f} over {results['retirements']} "
        f"retirements; window {results['scaledown_window_s']:g} s, target <= "
        f"{results['target_delay_s']:g} s ({'meets' if results['meets_target'] else 'misses'})"
    )
    print(
        f"keep_warm={results['keep_warm']}: "
        f"{'never violated' if results['keep_warm_held'] else 'VIOLATED'} "
        f"(fewest running {min(w['min_containers_gauge'] for w in warm):.0f}, fewest processes "
        f"{min(w['min_container_processes'] for w in warm)})"
    )


def parameters(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    return {
        "rounds": args.rounds,
        "burst_inputs": args.burst,
        "plot_burst_inputs": args.plot_burst,
        "seconds_per_input": INPUT_SECONDS,
        "ours_function": spec.as_dict(),
        "delay": "a container's process exit (polled every 10 ms) minus the last finish "
        "of an input on it",
        "keep_warm": "the containers gauge every 100 ms and the container processes every "
        "10 ms never below min_containers",
    }


def main(argv: list[str] | None = None) -> int:
    parser = options("scaledown", __doc__)
    parser.add_argument("--rounds", type=int, default=4, help="bursts, the plotted one included")
    parser.add_argument("--burst", type=int, default=40, help="inputs per burst")
    parser.add_argument("--plot-burst", type=int, default=300, help="inputs of the first burst")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per round, at most")
    parser.add_argument("--plot", type=Path, default=PLOT)
    bench = Bench("scaledown", parser, argv)
    args = bench.args
    port = free_port()
    node_args = (
        *("-c", "1", "-l", "WARNING", "-n", "scaledown@%h"),
        *("--concurrent-functions", OURS, "--concurrent-metrics-port", str(port)),
    )
    with bench:
        spec = bench.spec(OURS)
        seen = run_rounds(bench, args, node_args, port)
    results = results_of(seen["retirements"], seen["warm"], spec)
    print_summary(results)
    bench.write(
        parameters(args, spec),
        {"node": worker_command(node_args)},
        results,
        retirements=[asdict(r) for r in seen["retirements"]],
        plot={"path": str(args.plot), **seen["plotted"]},
    )
    print(f"wrote {args.plot}")
    return 0


def _steady_or_not_up(port: int, node_pid: int, keep_warm: int) -> bool:
    try:
        return steady(port, node_pid, keep_warm)
    except OSError:
        return False  # the metrics endpoint is not up yet


if __name__ == "__main__":
    sys.exit(run_main(main))
