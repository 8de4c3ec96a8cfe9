"""The supervisor: ``celery worker`` scales each function's containers by itself.

Real Redis, a real node (``celery worker``) and real container processes.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from celery import group

from .support import descendants, row, wait_for

APP = "tests.apps.scaling"
BURST = f"{APP}.burst"
WARM = f"{APP}.warm"
ZERO = f"{APP}.scale_to_zero"
OTHER = f"{APP}.other"
CRASHY = f"{APP}.crashy"


def start_node(workers, *functions, extra=()):
    return workers.start(APP, "-c", "1", "--concurrent-functions", ",".join(functions), *extra)


def test_burst_scales_up_at_once_never_above_the_limit_and_back_to_keep_warm(
    scaling_app, workers, rds
):
    start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 15, what="keep_warm container")
    sent_at = time.monotonic()
    result = group(scaling_app.burst.s("b", 1.0) for _ in range(600)).apply_async()
    most = 0
    reached_four_at = None
    while not result.ready():
        current = row(scaling_app, BURST)
        live = current["containers"] + current["retiring"]
        most = max(most, live)
        if reached_four_at is None and current["containers"] == 4:
            reached_four_at = time.monotonic() - sent_at
        assert time.monotonic() - sent_at < 60, "the burst did not finish"
    assert result.get(timeout=10) == ["b"] * 600
    assert int(rds.get("done:b")) == 600
    assert reached_four_at is not None and reached_four_at < 2.0, reached_four_at
    assert most == 4
    assert int(rds.get("peak:b")) <= 200
    # Idle for container_idle_timeout (3 s): back to keep_warm, never below.
    wait_for(lambda: row(scaling_app, BURST)["containers"] == 1, 15, what="scale-down to 1")
    time.sleep(1)
    assert row(scaling_app, BURST)["containers"] == 1


def test_keep_warm_containers_run_before_any_input(scaling_app, workers):
    start_node(workers, WARM)
    wait_for(lambda: row(scaling_app, WARM)["ready"] == 2, 15, what="two warm containers")
    assert row(scaling_app, WARM)["backlog"] == 0


def test_keep_warm_zero_scales_to_zero_and_back_up_on_demand(scaling_app, workers, rds):
    start_node(workers, ZERO)
    time.sleep(1)
    assert row(scaling_app, ZERO)["containers"] == 0
    first = group(scaling_app.scale_to_zero.s("z1") for _ in range(20)).apply_async()
    assert first.get(timeout=30) == ["z1"] * 20
    wait_for(lambda: row(scaling_app, ZERO)["containers"] == 0, 15, what="scale to zero")
    second = group(scaling_app.scale_to_zero.s("z2") for _ in range(5)).apply_async()
    assert second.get(timeout=30) == ["z2"] * 5


def test_a_flood_of_one_function_never_delays_another(scaling_app, workers):
    start_node(workers, BURST, OTHER)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 15, what="keep_warm container")
    flood = group(scaling_app.burst.s("flood", 1.0) for _ in range(2000)).apply_async()
    time.sleep(0.5)
    started = time.monotonic()
    assert scaling_app.other.delay("one").get(timeout=10) == "one"
    assert time.monotonic() - started < 2.0
    flood.revoke()


def test_scale_down_while_inputs_run_loses_nothing(scaling_app, workers, rds):
    start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 15, what="keep_warm container")
    sent = 400
    result = group(scaling_app.burst.s("drain", 0.8) for _ in range(sent)).apply_async()
    wait_for(lambda: row(scaling_app, BURST)["containers"] == 4, 10, what="4 containers")
    time.sleep(0.3)
    # Lower the bound while every container is busy: three drain at once.
    replies = scaling_app.app.control.broadcast(
        "concurrent_update",
        arguments={"function": BURST, "bounds": {"max_containers": 1}},
        reply=True,
        timeout=2,
    )
    assert any("ok" in answer for reply in replies for answer in reply.values())
    wait_for(lambda: row(scaling_app, BURST)["containers"] == 1, 5, what="drain to 1")
    assert result.get(timeout=60) == ["drain"] * sent
    assert int(rds.get("done:drain")) == sent


def test_crash_looping_function_backs_off_and_others_keep_serving(scaling_app, workers):
    node = start_node(workers, CRASHY, OTHER)
    scaling_app.crashy.delay("never")
    wait_for(lambda: row(scaling_app, CRASHY)["crashes"] >= 3, 20, what="three crashes")
    crashes_then = row(scaling_app, CRASHY)["crashes"]
    assert row(scaling_app, CRASHY)["crash_loop"]
    assert "exit status 3" in row(scaling_app, CRASHY)["error"]
    for _ in range(3):
        assert scaling_app.other.delay("fine").get(timeout=10) == "fine"
    time.sleep(3)
    # Exponential back-off: a handful more attempts, not a fork bomb.
    assert row(scaling_app, CRASHY)["crashes"] - crashes_then <= 2
    assert "crashed (exit status 3)" in workers.log_of(node)


def test_sigkill_of_the_node_leaves_no_container_behind(scaling_app, workers):
    node = start_node(workers, WARM, BURST)
    wait_for(lambda: row(scaling_app, WARM)["ready"] == 2, 15, what="warm containers")
    group(scaling_app.burst.s("k", 1.0) for _ in range(100)).apply_async()
    time.sleep(1)
    family = descendants(node.pid)
    assert len(family) >= 4
    os.kill(node.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_stopping_the_node_drains_every_container(scaling_app, workers, rds):
    node = start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 15, what="keep_warm container")
    group(scaling_app.burst.s("stop", 1.5) for _ in range(40)).apply_async()
    wait_for(lambda: int(rds.get("running:stop") or 0) == 40, 10, what="40 running")
    family = descendants(node.pid)
    node.send_signal(signal.SIGTERM)
    node.wait(30)
    assert int(rds.get("done:stop")) == 40
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive


@pytest.mark.parametrize("bad", [{"max_containers": 0}, {"min_containers": 9}, {"max_inputs": 3}])
def test_invalid_runtime_update_is_refused_and_changes_nothing(scaling_app, workers, bad):
    start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 15, what="keep_warm container")
    replies = scaling_app.app.control.broadcast(
        "concurrent_update", arguments={"function": BURST, "bounds": bad}, reply=True, timeout=2
    )
    answers = [a for reply in replies for a in reply.values() if not a.get("skip")]
    assert answers and all("error" in a for a in answers)
    key, value = next(iter(bad.items()))
    assert key in answers[0]["error"] and repr(value) in answers[0]["error"]
    current = row(scaling_app, BURST)
    assert (current["min_containers"], current["max_containers"]) == (1, 4)
