"""Run every benchmark scenario, then print one summary table: ``make bench``.

Run it with ``python -m benchmarks.run_all`` from the repository root. Each scenario
runs as its own process (``python -m benchmarks.bench_<name>``), which starts its own
private Redis and workers, stops every process it started, and writes
``benchmarks/results/<name>.json``. Some rounds are fewer than the modules' standalone
defaults (reaction: 12 bursts a side, not 20; density: 3 runs of ours, 2 of the others;
overhead: 3,000 inputs a run, not 4,000; cluster: 3 bursts a side, not 5) so that the
whole set takes about eight minutes on a 2-core machine; every figure is still a median
of several runs, or a ratio of medians, with its spread.

1. ``burst``: 2,000 inputs of ``sleep(0.5)``, ours (N=100, up to 4 containers, from
   zero) against plain Celery's prefork, threads and gevent pools.
2. ``overhead``: no-op inputs through one container (N=10) against ``-P threads -c 10``.
3. ``reaction``: a burst to the first input on a new container, against exec'ing a
   worker and Celery's ``--autoscale``; and the idle node's CPU.
4. ``density``: 10,000 inputs of ``asyncio.sleep(1)`` in one container.
5. ``scaledown``: the last input to the container's exit, against
   ``container_idle_timeout``; ``keep_warm``; and ``results/scaling.png``.
6. ``cluster``: a burst on three nodes in cluster scope against one node, with the
   same bound over the cluster; what the leases cost Redis under load and at idle,
   and an idle node's CPU, against ``--concurrent-scope node`` (10 s idle windows, not
   20).
7. ``batching``: ``@batched`` against celery-batches, where installed.
8. ``threads``: CPU per input of a 100-thread container against ``-P threads -c 100``.
9. ``refill``: 1,000 inputs of ``sleep(0.1)`` on 10 slots, live, results stored: the
   throughput and the refill gap against plain Celery, Taskiq and arq.
10. ``intake``: 10,000 queued no-ops taken in by one container against plain Celery,
    Taskiq and arq, and 10,000 ``asyncio.sleep(1)`` inputs published live.

It also writes ``results/summary.json`` and ``results/summary.md`` (the table as
Markdown, for ``benchmarks/README.md``). ``--only burst,density`` runs some of them;
the table then shows the stored results of the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.scenario import RESULTS, run_main
from devkit import ROOT
from devkit.servers import stop_process

#: how long a scenario stopped for its time may take to stop its own processes
STOP_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    args: tuple[str, ...]
    #: seconds it may take before it is stopped
    timeout: float

    @property
    def module(self) -> str:
        return f"benchmarks.bench_{self.name}"

    @property
    def result(self) -> Path:
        return RESULTS / f"{self.name}.json"


SCENARIOS = (
    Scenario("burst", "1. I/O-bound burst", ("--rounds", "5", "--prefork-rounds", "2"), 240),
    Scenario("overhead", "2. Per-input overhead", ("--rounds", "8", "--inputs", "3000"), 180),
    Scenario(
        "reaction",
        "3. Scale-up reaction",
        ("--rounds", "12", "--idle-seconds", "10", "--baseline-seconds", "6"),
        180,
    ),
    Scenario("density", "4. Async density", ("--rounds", "3", "--compare-rounds", "2"), 240),
    Scenario("scaledown", "5. Scale-down", ("--rounds", "4"), 150),
    Scenario(
        "cluster",
        "6. Cluster mode",
        ("--rounds", "3", "--idle-seconds", "10", "--monitor-seconds", "5"),
        240,
    ),
    Scenario("batching", "7. Dynamic batching", ("--rounds", "2"), 300),
    Scenario("threads", "8. CPU per input at 100 threads", ("--rounds", "2"), 180),
    Scenario("refill", "9. Refill", ("--rounds", "3"), 240),
    Scenario("intake", "10. Intake", ("--rounds", "2"), 300),
)


@dataclass(frozen=True)
class Row:
    """One line of the summary: a figure of ours, what it is compared with, the target."""

    scenario: str
    figure: str
    ours: str
    other: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None


def _spread(numbers: dict[str, float], fmt: str = "{:.2f}", unit: str = "") -> str:
    median, low, high = (fmt.format(numbers[k]) for k in ("median", "min", "max"))
    return f"{median}{unit} ({low}–{high})"


def burst_rows(report: dict[str, Any]) -> list[Row]:
    results = report["results"]
    ours = results["ours"]
    title = "1. burst"
    rows = [
        Row(
            title,
            "efficiency = ideal / wall",
            _spread(ours["efficiency"], "{:.3f}"),
            f"ideal {ours['ideal_s']['median']:.2f} s (cold start "
            f"{1000 * ours['first_start_s']['median']:.0f} ms)",
            target=f">= {results['target_efficiency']}",
            met=results["meets_target"],
        ),
        Row(title, "wall, 2,000 x sleep(0.5)", _spread(ours["wall_s"], unit=" s")),
    ]
    full = ours.get("full_scale_s")  # reports before it was measured have none
    if full:
        seconds = report["parameters"]["seconds_per_input"]
        rows.append(
            Row(
                title,
                "burst to all 4 containers forked",
                _spread(full, "{:.3f}", " s"),
                f"one input {seconds:g} s",
                f"{ours['full_scale_per_input_time']:.2f} of one input",
            )
        )
    labels = {
        "threads": "-P threads -c 400",
        "gevent": "-P gevent -c 400",
        "prefork": "-P prefork -c 2",
    }
    for name, label in labels.items():
        other = results[name]
        note = " (extrapolated)" if other["extrapolated"] else ""
        rows.append(
            Row(
                title,
                f"wall vs plain {label}",
                f"{ours['wall_s']['median']:.2f} s",
                f"{_spread(other['wall_s'], unit=' s')}{note}, efficiency "
                f"{other['efficiency']['median']:.2f}",
                f"speed-up {other['speedup_of_ours']:.2f}x",
            )
        )
    return rows


def overhead_rows(report: dict[str, Any]) -> list[Row]:
    results = report["results"]
    ours, plain = results["ours"], results["plain"]
    return [
        Row(
            "2. overhead",
            "no-op inputs/s, N=10 vs -P threads -c 10",
            _spread(ours["inputs_per_s"], "{:.0f}"),
            _spread(plain["inputs_per_s"], "{:.0f}"),
            f"{results['throughput_ratio']:.3f} (per round "
            f"{results['per_round_throughput_ratio']['min']:.2f}–"
            f"{results['per_round_throughput_ratio']['max']:.2f})",
            f">= {results['target']}",
            results["meets_target"],
        ),
        Row(
            "2. overhead",
            "CPU ms per input",
            _spread(ours["cpu_ms_per_input"], "{:.3f}"),
            _spread(plain["cpu_ms_per_input"], "{:.3f}"),
            f"{results['cpu_ratio_plain_over_ours']:.3f} (plain/ours)",
        ),
    ]


def reaction_rows(report: dict[str, Any]) -> list[Row]:
    results = report["results"]
    ours = results["ours"]
    rows = []
    for name, label in (("exec", "exec'd worker"), ("autoscale", "--autoscale")):
        other = results[name]
        rows.append(
            Row(
                "3. reaction",
                f"burst to first input, p50 / p95, vs {label}",
                f"{ours['p50_ms']:.0f} / {ours['p95_ms']:.0f} ms",
                f"{other['p50_ms']:.0f} / {other['p95_ms']:.0f} ms",
                f"speed-up {results['p50_ratio_to_ours'][name]:.1f}x (p50)",
                f"p50 <= {results['target_p50_ms']:.0f} ms",
                results["meets_target"],
            )
        )
    flanked = results.get("flanked")  # reports before it was measured have none
    if flanked:
        rows.append(
            Row(
                "3. reaction",
                "... beside a flood of another function, p50 / p95",
                f"{flanked['p50_ms']:.0f} / {flanked['p95_ms']:.0f} ms",
                f"alone {ours['p50_ms']:.0f} / {ours['p95_ms']:.0f} ms",
                f"{results['p50_ratio_to_ours']['flanked']:.2f}x alone (p50)",
            )
        )
    idle = results["idle"]
    rows.append(
        Row(
            "3. reaction",
            "idle node main process, share of a core",
            f"{100 * idle['node_main_process_share']:.2f} %",
            f"plain node {100 * idle['plain_node_main_process_share']:.2f} %",
            target=f"<= {100 * idle['target']:.0f} %",
            met=idle["meets_target"],
        )
    )
    return rows


def density_rows(report: dict[str, Any]) -> list[Row]:
    results = report["results"]
    ours = results["ours"]
    blocking = results["threads + asyncio.run"]
    floor = results["floor: no-op intake"]
    targets, meets = results["targets"], results["meets_targets"]
    title = "4. density"
    return [
        Row(
            title,
            "10,000 x asyncio.sleep(1): first start to last finish",
            _spread(ours["wall_s"], unit=" s"),
            f"threads -c 1000 + asyncio.run {blocking['wall_s']['median']:.2f} s",
            f"speed-up {blocking['wall_s']['median'] / ours['wall_s']['median']:.2f}x",
            f"<= {targets['wall_s']:g} s",
            meets["wall"],
        ),
        Row(
            title,
            "... from the first publish (publishing takes)",
            f"{ours['from_publish_s']['median']:.2f} s ({ours['publish_s']['median']:.2f} s)",
            f"{blocking['from_publish_s']['median']:.2f} s",
        ),
        Row(
            title,
            "... floor: a plain worker takes in 10,000 no-ops",
            f"pre-loaded {results['ours, pre-loaded']['wall_s']['median']:.2f} s",
            f"floor {floor['wall_s']['median']:.2f} s (+1 s sleep = "
            f"{results['floor_plus_sleep_s']:.2f} s)",
        ),
        Row(
            title,
            "threads in the process",
            str(ours["max_threads"]),
            str(blocking["max_threads"]),
            target=f"<= {targets['threads']}",
            met=meets["threads"],
        ),
        Row(
            title,
            "RSS of the process",
            f"{ours['max_rss_mb']:.0f} MB",
            f"{blocking['max_rss_mb']:.0f} MB",
            target=f"<= {targets['rss_mb']:g} MB",
            met=meets["rss"],
        ),
    ]


def scaledown_rows(report: dict[str, Any]) -> list[Row]:
    results = report["results"]
    window = results["scaledown_window_s"]
    return [
        Row(
            "5. scale-down",
            f"last input to exit, container_idle_timeout {window:g} s",
            _spread(results["delay_s"], unit=" s"),
            f"{results['retirements']} retirements",
            target=f"<= {results['target_delay_s']:g} s",
            met=results["meets_target"],
        ),
        Row(
            "5. scale-down",
            f"keep_warm={results['keep_warm']} never violated",
            "yes" if results["keep_warm_held"] else "no",
            met=results["keep_warm_held"],
        ),
    ]


def cluster_rows(report: dict[str, Any]) -> list[Row]:
    results, params = report["results"], report["parameters"]
    found, load, idle = results["burst"], results["load"], results["idle"]
    three, one, ratio = found["3 nodes"], found["1 node"], found["ratio_3_over_1"]
    title = "6. cluster"
    work = f"{params['inputs']:,} x sleep({params['seconds']:g}), limit 3"
    cluster, node = load["cluster"], load["node"]
    per_input = cluster["counted"]["commands_per_input"], node["counted"]["commands_per_input"]
    idle_cluster, idle_node = idle["cluster"], idle["node"]
    cost = results["idle_cost_of_cluster_mode"]
    return [
        Row(
            title,
            f"burst to first input, 3 nodes vs 1 ({work})",
            _spread({k: 1000 * v for k, v in three["reaction_s"].items()}, "{:.0f}", " ms"),
            _spread({k: 1000 * v for k, v in one["reaction_s"].items()}, "{:.0f}", " ms"),
            f"{ratio['reaction']:.2f}x (3/1)",
        ),
        Row(
            title,
            "... wall, 3 nodes vs 1",
            _spread(three["wall_s"], unit=" s"),
            _spread(one["wall_s"], unit=" s"),
            f"{ratio['wall']:.2f}x (3/1)",
        ),
        Row(
            title,
            "Redis commands per input, 3 nodes, cluster vs node scope",
            f"{per_input[0]:.1f} (cluster mode's scripts "
            f"{cluster['monitor']['cluster_mode_scripts_per_s']:.0f}/s)",
            f"{per_input[1]:.1f}",
            f"{per_input[0] / per_input[1]:.2f}x",
        ),
        Row(
            title,
            "idle node main process, cluster vs node scope",
            _spread({k: 100 * v for k, v in idle_cluster["main_process_share"].items()}, unit=" %"),
            f"{100 * idle_node['main_process_share']['median']:.2f} %",
            f"+{100 * cost['main_process_share']:.2f} %",
            f"<= {100 * results['target_idle_share']:.0f} %",
            results["meets_idle_target"],
        ),
        Row(
            title,
            "idle Redis commands/s per node (client calls), cluster vs node scope",
            f"{idle_cluster['counted']['commands_per_s_per_node']:.0f} "
            f"({idle_cluster['monitor']['client_calls_per_s_per_node']:.0f})",
            f"{idle_node['counted']['commands_per_s_per_node']:.0f} "
            f"({idle_node['monitor']['client_calls_per_s_per_node']:.0f})",
            f"+{cost['commands_per_s_per_node']:.0f} (+{cost['client_calls_per_s_per_node']:.0f})",
            f"<= {results['idle_commands_ceiling_per_node']:.0f}",
            results["idle_commands_within_ceiling"],
        ),
    ]


BATCHING_LOADS = {"burst": "burst", "steady": "steady load", "trickle": "trickle"}


def batching_rows(report: dict[str, Any]) -> list[Row]:
    """``@batched`` against celery-batches (when installed) on each load."""
    rows = []
    for key, load in BATCHING_LOADS.items():
        sides = report["results"].get(key) or {}
        ours, peer = sides.get("batched"), sides.get("batches")
        if ours is None:
            continue
        other = (
            "not installed"
            if peer is None
            else (f"{peer['items_per_s']['median']:.0f}/s, p50 {peer['p50_ms']['median']:.0f} ms")
        )
        ratio = (
            ""
            if peer is None
            else (f"{ours['items_per_s']['median'] / peer['items_per_s']['median']:.2f}x")
        )
        rows.append(
            Row(
                "7. batching",
                f"@batched vs celery-batches, {load} (items/s, p50)",
                f"{ours['items_per_s']['median']:.0f}/s, p50 {ours['p50_ms']['median']:.0f} ms",
                other,
                ratio,
            )
        )
    return rows


def threads_rows(report: dict[str, Any]) -> list[Row]:
    """CPU per input of one 100-thread container against ``-P threads -c 100``."""
    results = report["results"]
    ours, plain = results["ours"], results["plain"]
    return [
        Row(
            "8. threads",
            "CPU ms per input, 2,000 x sleep(0.5), 100 threads vs -P threads -c 100",
            _spread(ours["cpu_ms_per_input"], "{:.3f}"),
            _spread(plain["cpu_ms_per_input"], "{:.3f}"),
            f"{results['cpu_ratio_ours_over_plain']:.2f}x (ours/plain)",
            f"<= {results['target_cpu_ratio']}",
            results["meets_target"],
        ),
        Row(
            "8. threads",
            "... wall, first publish to last finish",
            _spread(ours["wall_s"], unit=" s"),
            _spread(plain["wall_s"], unit=" s"),
            f"{results['wall_ratio_ours_over_plain']:.2f}x",
        ),
    ]


def refill_rows(report: dict[str, Any]) -> list[Row]:
    """1,000 x sleep(0.1) on 10 slots: throughput and the refill gap, against the others."""
    results = report["results"]
    ours = results["ours"]
    others = [name for name in ("plain", "taskiq", "arq") if name in results]
    rates = ", ".join(f"{n} {results[n]['inputs_per_s']['median']:.1f}/s" for n in others)
    gaps = ", ".join(f"{n} {results[n]['gap_ms_p50']['median']:.2f} ms" for n in others)
    return [
        Row(
            "9. refill",
            "1,000 x sleep(0.1), 10 slots, live, results stored: inputs/s",
            _spread(ours["inputs_per_s"], "{:.1f}", "/s"),
            rates,
            f"{results['ours_over_plain']:.3f}x plain, {results['ours_over_ceiling']:.3f}x ceiling",
            ">= 99/s, >= 1.0x plain",
            ours["inputs_per_s"]["median"] >= 99 and results["ours_over_plain"] >= 1.0,
        ),
        Row(
            "9. refill",
            "... slot freed to next input started, p50",
            _spread(ours["gap_ms_p50"], unit=" ms"),
            gaps,
            "",
            "<= 1 ms",
            ours["gap_ms_p50"]["median"] <= 1.0,
        ),
    ]


def intake_rows(report: dict[str, Any]) -> list[Row]:
    """Intake of queued no-ops, and 10,000 async inputs published live."""
    results = report["results"]
    rows = []
    for kind, label in (
        ("intake", "10,000 queued no-ops, results stored: inputs/s"),
        ("intake, results ignored", "... results ignored: inputs/s"),
    ):
        sides = results[kind]
        others = [n for n in ("plain", "taskiq", "arq") if n in sides]
        rows.append(
            Row(
                "10. intake",
                label,
                f"{sides['ours']['median']:.0f}/s",
                ", ".join(f"{n} {sides[n]['median']:.0f}/s" for n in others),
                f"{sides['ours_over_plain']:.2f}x plain",
                ">= 3x plain",
                sides["ours_over_plain"] >= 3.0,
            )
        )
    live = results["live"]
    others = [n for n in ("taskiq", "arq") if n in live]
    rows.append(
        Row(
            "10. intake",
            "10,000 x asyncio.sleep(1) live: last publish to last end",
            f"{live['ours']['median']:.2f} s",
            ", ".join(f"{n} {live[n]['median']:.2f} s" for n in others),
            "",
            "about 1.5 s",
            live["ours"]["median"] <= 1.6,
        )
    )
    return rows


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "burst": burst_rows,
    "overhead": overhead_rows,
    "reaction": reaction_rows,
    "density": density_rows,
    "scaledown": scaledown_rows,
    "cluster": cluster_rows,
    "refill": refill_rows,
    "intake": intake_rows,
    "batching": batching_rows,
    "threads": threads_rows,
}


def load_of(report: dict[str, Any]) -> str:
    env = report["environment"]
    return f"{env['load_average_1m_before']:.2f}/{env['load_average_1m_after']:.2f}"


def verdict(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def table(rows: list[Row], loads: dict[str, str]) -> list[list[str]]:
    header = ["scenario", "figure", "ours", "compared with", "ratio", "target", "met", "load"]
    lines = [header]
    shown: set[str] = set()
    for row in rows:
        load = loads.get(row.scenario, "") if row.scenario not in shown else ""
        shown.add(row.scenario)
        lines.append(
            [row.scenario, row.figure, row.ours, row.other, row.ratio, row.target]
            + [verdict(row.met), load]
        )
    return lines


def render_text(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def render_markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines[1:]
    ]
    return "\n".join(out)


def run(scenario: Scenario) -> tuple[int, float]:
    """Run one scenario's module; return its exit status and how long it took."""
    print(f"\n=== {scenario.title}: python -m {scenario.module} {' '.join(scenario.args)}")
    print(f"    (load average {os.getloadavg()[0]:.2f})", flush=True)
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", scenario.module, *scenario.args], cwd=ROOT, start_new_session=True
    )
    try:
        code = proc.wait(scenario.timeout)
    except subprocess.TimeoutExpired:
        print(f"{scenario.name}: stopped after {scenario.timeout:.0f} s", flush=True)
        code = 124
    finally:
        # Also when run_all itself is interrupted: the scenario, in a session of its own,
        # got no Ctrl-C from the terminal.
        stop_scenario(proc)
    return code, time.monotonic() - began


def stop_scenario(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt a scenario and give it the time to stop what it started, then stop it.

    Only the scenario knows its workers and its Redis (each in a session of its own):
    a SIGINT runs its ``finally`` blocks, which stop them by their PIDs before it exits.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE_SECONDS)
    stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args(argv)
    wanted = {name for name in args.only.split(",") if name}
    unknown = wanted - {s.name for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    load_before = os.getloadavg()
    began = time.monotonic()
    status: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        if wanted and scenario.name not in wanted:
            continue
        code, seconds = run(scenario)
        status[scenario.name] = {"exit_status": code, "seconds": round(seconds, 1)}
    elapsed = time.monotonic() - began

    rows: list[Row] = []
    loads: dict[str, str] = {}
    reports: dict[str, Any] = {}
    for scenario in SCENARIOS:
        if not scenario.result.exists():
            rows.append(Row(scenario.title, "no result", "-"))
            continue
        report = json.loads(scenario.result.read_text())
        reports[scenario.name] = report
        found = ROWS[scenario.name](report)
        rows += found
        if found:
            loads[found[0].scenario] = load_of(report)
    lines = table(rows, loads)
    print()
    print(render_text(lines))
    failed = [name for name, s in status.items() if s["exit_status"]]
    print(
        f"\nran {', '.join(status) or 'nothing'} in {elapsed:.0f} s; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1 min; 'load' column: "
        f"each scenario's before/after); {os.cpu_count()} CPUs"
    )
    if failed:
        print(f"FAILED: {', '.join(failed)} (the table shows their last stored results)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": "python -m benchmarks.run_all" + (f" --only {args.only}" if wanted else ""),
        "seconds": elapsed,
        "scenarios": status,
        "rows": [row.__dict__ for row in rows],
        "load_average_1m_before": load_before[0],
        "load_average_1m_after": os.getloadavg()[0],
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(render_markdown(lines) + "\n")
    print(f"wrote {RESULTS / 'summary.json'} and {RESULTS / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
