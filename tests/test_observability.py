"""Watching it work: Flower, ``inspect stats``, Prometheus metrics, the status watch and logs.

Real Redis, a real node (``celery worker``), real containers and a real ``celery flower``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from urllib.request import urlopen

import psutil
from celery import group
from prometheus_client.parser import text_string_to_metric_families

from devkit.servers import FlowerServer

from .apps.measure import UNTIL_RELEASED
from .support import ROOT, free_port, wait_for
from .test_supervisor import APP, BURST, CRASHY, row

HOST = socket.gethostname()


def container(ident: int | str) -> str:
    """The node name of a burst container, as Flower and ``inspect`` show it."""
    return f"{BURST}-{ident}@{HOST}"


def start_node(workers, *functions, extra=()):
    return workers.start(APP, "-c", "1", "--concurrent-functions", ",".join(functions), *extra)


# --- Flower --------------------------------------------------------------------------------


def burst_workers(flower: FlowerServer) -> dict[str, bool]:
    """Flower's view of the burst containers: node name -> online."""
    status = flower.get_json("/api/workers?status=true")
    return {name: alive for name, alive in status.items() if name.startswith(f"{BURST}-")}


def test_flower_shows_each_container_its_tasks_and_the_retired_ones_offline(
    scaling_app, workers, broker_url, tmp_path
):
    start_node(workers, BURST, extra=("-E",))
    flower = FlowerServer(APP, broker_url, cwd=str(ROOT), log_path=str(tmp_path / "flower.log"))
    try:
        flower.start()
        wait_for(lambda: burst_workers(flower) == {container(1): True}, 60, what="keep_warm")

        # Two seconds each: a wave long enough for the fourth container, however late a
        # loaded machine starts it, to find inputs still waiting.
        first = group(scaling_app.burst.s("f1", 2.0) for _ in range(300)).apply_async()
        wait_for(
            lambda: sum(burst_workers(flower).values()) == 4, 60, what="four containers online"
        )
        assert first.get(timeout=60) == ["f1"] * 300

        # Idle for container_idle_timeout (3 s): three retire, and say goodbye.
        def retired() -> dict[str, bool] | None:
            seen = burst_workers(flower)
            return seen if sorted(seen.values()) == [False, False, False, True] else None

        seen = wait_for(retired, 60, interval=0.5, what="three containers offline in Flower")
        assert set(seen) == {container(n) for n in range(1, 5)}

        tasks = flower.get_json("/api/tasks?limit=1000")
        assert len(tasks) == 300
        assert {t["state"] for t in tasks.values()} == {"SUCCESS"}
        assert {t["worker"] for t in tasks.values()} == set(seen)
        # sleep(2) each: what Flower shows is the input's own runtime (a loaded machine
        # stretches it, never shrinks it)
        assert all(1.9 <= t["runtime"] < 30 for t in tasks.values())
        assert all(t["name"] == BURST for t in tasks.values())

        # A second burst reuses the names: Flower shows the same four, not four more.
        second = group(scaling_app.burst.s("f2", 1.0) for _ in range(300)).apply_async()
        assert second.get(timeout=60) == ["f2"] * 300
        wait_for(retired, 60, interval=0.5, what="back to one container")
        assert set(burst_workers(flower)) == set(seen)
        workers_page = flower.get_json("/workers?json=1")["data"]
        assert sum(1 for w in workers_page if w["hostname"].startswith(f"{BURST}-")) == 4

        # The supervisor node's stats carry the pools; the container's name its function.
        node = f"celery@{HOST}"
        stats = flower.get_json(f"/api/workers?refresh=1&workername={node}")[node]["stats"]
        pools = {r["function"]: r for r in stats["concurrent"]["functions"]}
        assert pools[BURST]["containers"] == 1
        assert pools[BURST]["scale_ups"] >= 3 and pools[BURST]["scale_downs"] >= 2
        page = flower.get(f"/worker/{node}").decode()
        assert "<td>concurrent</td>" in page and BURST in page  # the Other tab
        alive = next(n for n, up in burst_workers(flower).items() if up)
        stats = flower.get_json(f"/api/workers?refresh=1&workername={alive}")[alive]["stats"]
        assert stats["concurrent_container"]["function"] == BURST
    finally:
        flower.stop()


# --- inspect stats and Prometheus ----------------------------------------------------------


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The node's metrics: sample name -> {sorted labels: value}."""
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def burst_value(samples, name: str, **extra: str) -> float:
    # Its broker is Redis: the bounds hold over the cluster.
    given = {"function": BURST, "node": f"celery@{HOST}", "scope": "cluster", **extra}
    labels = tuple(sorted(given.items()))
    return samples[name][labels]


def test_inspect_stats_has_a_section_for_the_function_pools(scaling_app, workers):
    start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    stats = scaling_app.app.control.inspect(timeout=1).stats()
    section = stats[f"celery@{HOST}"]["concurrent"]
    assert section["node_max_containers"] >= 1
    (pool,) = section["functions"]
    assert (pool["function"], pool["containers"], pool["max_containers"]) == (BURST, 1, 4)
    assert stats[container(1)]["concurrent_container"]["function"] == BURST


def test_prometheus_metrics_follow_a_burst_on_a_loopback_port(scaling_app, workers):
    port = free_port()
    node = start_node(workers, BURST, extra=("--concurrent-metrics-port", str(port)))
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    listening = [c for c in psutil.Process(node.pid).net_connections("tcp") if c.status == "LISTEN"]
    assert [c.laddr for c in listening if c.laddr.port == port] == [("127.0.0.1", port)]

    def cold_started():
        samples = scrape(port)
        count = burst_value(samples, "celery_concurrent_cold_start_seconds_count")
        return samples if count >= 1 else None

    idle = wait_for(cold_started, 30, what="a cold start observed")
    assert burst_value(idle, "celery_concurrent_containers") == 1
    assert burst_value(idle, "celery_concurrent_min_containers") == 1
    assert burst_value(idle, "celery_concurrent_max_containers") == 4
    assert burst_value(idle, "celery_concurrent_in_flight") == 0
    assert burst_value(idle, "celery_concurrent_backlog") == 0
    assert burst_value(idle, "celery_concurrent_capacity") == 50
    assert burst_value(idle, "celery_concurrent_scale_ups_total") == 1
    assert burst_value(idle, "celery_concurrent_scale_downs_total") == 0
    assert burst_value(idle, "celery_concurrent_crashes_total") == 0

    result = group(scaling_app.burst.s("m", UNTIL_RELEASED) for _ in range(400)).apply_async()
    peak: dict[str, float] = {}

    def scaled_up() -> bool:
        samples = scrape(port)
        for name in ("containers", "in_flight", "backlog", "capacity"):
            value = burst_value(samples, f"celery_concurrent_{name}")
            peak[name] = max(peak.get(name, 0), value)
        return peak["capacity"] == 200 and peak["in_flight"] > 0 and peak["backlog"] > 0

    # Held until released: the gauges are read while the burst is in full swing.
    wait_for(scaled_up, 60, interval=0.2, what="the burst in the metrics")
    scaling_app.recorder.release("m")
    assert result.get(timeout=60) == ["m"] * 400
    assert peak["containers"] == 4 and peak["capacity"] == 200
    assert 0 < peak["in_flight"] <= 200
    assert peak["backlog"] > 0

    wait_for(
        lambda: burst_value(scrape(port), "celery_concurrent_containers") == 1,
        30,
        what="scale-down to keep_warm in the metrics",
    )
    after = scrape(port)
    assert burst_value(after, "celery_concurrent_scale_ups_total") >= 2
    assert burst_value(after, "celery_concurrent_scale_downs_total") >= 1
    assert burst_value(after, "celery_concurrent_crashes_total") == 0
    starts = burst_value(after, "celery_concurrent_cold_start_seconds_count")
    assert starts >= 4
    # Every cold start is in the histogram, each in one bucket (how fast they are is
    # bench_reaction's figure, not this test's).
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for labels, value in after["celery_concurrent_cold_start_seconds_bucket"].items()
        if dict(labels)["function"] == BURST
    )
    assert buckets[-1] == (float("inf"), starts)
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)
    assert burst_value(after, "celery_concurrent_cold_start_seconds_sum") > 0


# --- status --watch and the logs -----------------------------------------------------------


def run_status(broker_url: str, *args: str, timeout: float = 30) -> str:
    env = {"CELERY_BROKER_URL": broker_url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "concurrent", "status", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_status_watch_refreshes_with_utilisation_and_errors(scaling_app, workers, broker_url):
    start_node(workers, BURST, CRASHY)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    scaling_app.crashy.delay("never")
    wait_for(lambda: row(scaling_app, CRASHY)["crash_loop"], 60, what="a crash loop")
    result = group(scaling_app.burst.s("w", UNTIL_RELEASED) for _ in range(400)).apply_async()
    # Held until released: every frame of the watch sees the burst in flight.
    wait_for(lambda: row(scaling_app, BURST)["in_flight"] > 0, 60, what="the burst running")
    began = time.monotonic()
    out = run_status(broker_url, "--watch", "--interval", "1", "--count", "3")
    assert time.monotonic() - began >= 2  # three frames a second apart
    frames = [f for f in out.split("\n\n") if f.strip()]
    assert len(frames) == 3
    for frame in frames:
        stamp, header, *lines = frame.strip().splitlines()
        assert re.fullmatch(r"\d\d:\d\d:\d\d", stamp)
        assert "UTILISATION" in header and "ERRORS" in header and "IN FLIGHT" in header
        rows = {line.split()[0]: line for line in lines}
        assert re.search(r"crash loop \(\d+ crashes\); exit status 3", rows[CRASHY])
    busy = [f for f in frames if re.search(rf"{re.escape(BURST)} .* [1-9]\d*%", f)]
    assert busy, out
    scaling_app.recorder.release("w")
    result.get(timeout=60)

    # --json --watch: one JSON list per line, the same rows as --json.
    lines = run_status(broker_url, "--json", "--watch", "--count", "2").splitlines()
    assert len(lines) == 2
    listed = [json.loads(line) for line in lines]
    once = json.loads(run_status(broker_url, "--json"))
    assert [r["function"] for r in listed[0]] == [r["function"] for r in once]


def test_node_log_has_an_info_line_per_scale_decision_and_a_warning_per_crash(scaling_app, workers):
    node = start_node(workers, BURST, CRASHY)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    scaling_app.crashy.delay("never")
    result = group(scaling_app.burst.s("l", 1.0) for _ in range(300)).apply_async()
    assert result.get(timeout=60) == ["l"] * 300
    wait_for(lambda: row(scaling_app, BURST)["containers"] == 1, 30, what="scale-down")
    final = row(scaling_app, BURST)
    crashes_before = row(scaling_app, CRASHY)["crashes"]
    log = workers.log_of(node)
    crashes_after = row(scaling_app, CRASHY)["crashes"]

    decision = re.compile(
        rf"INFO/MainProcess\] {re.escape(BURST)}: (\d+) -> (\d+) containers "
        r"\(backlog \d+, in flight \d+, capacity \d+(?:; ([^)]*))?\)$",
        re.M,
    )
    changes = [(int(a), int(b), why) for a, b, why in decision.findall(log)]
    ups = [c for c in changes if c[1] > c[0]]
    downs = [c for c in changes if c[1] < c[0]]
    assert (len(ups), len(downs)) == (final["scale_ups"], final["scale_downs"])
    assert ups[0] == (0, 1, "min_containers 1")  # keep_warm, before any input
    assert max(b for _, b, _ in ups) == 4  # the burst, up to concurrency_limit
    assert downs and all("idle for scaledown_window 3s" in why for _, _, why in downs)

    warnings = re.findall(
        rf"WARNING/MainProcess\] {re.escape(CRASHY)}: container \S+ crashed \(exit status 3\)",
        log,
    )
    assert 1 <= crashes_before <= len(warnings) <= crashes_after
