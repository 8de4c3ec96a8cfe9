"""The supervisor: ``celery worker`` scales each function's containers by itself.

Real Redis, a real node (``celery worker``) and real container processes.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest
from celery import group
from celery.result import ResultSet

from celery_concurrent import spec_of

from .apps.measure import UNTIL_RELEASED
from .support import (
    burst,
    containers_of,
    descendants,
    done,
    publish_template,
    row,
    running,
    wait_for,
)

APP = "tests.apps.scaling"
BURST = f"{APP}.burst"
WARM = f"{APP}.warm"
ZERO = f"{APP}.scale_to_zero"
OTHER = f"{APP}.other"
CRASHY = f"{APP}.crashy"


def start_node(workers, *functions, extra=()):
    return workers.start(APP, "-c", "1", "--concurrent-functions", ",".join(functions), *extra)


def update(scaling_app, bounds: dict) -> dict:
    """The node's answer to ``concurrent_update`` of the burst function's ``bounds``.

    Addressed to the node alone, so the answer comes as soon as it has one, however
    loaded the machine (a broadcast to all would wait out its whole timeout).
    """
    node = f"celery@{socket.gethostname()}"
    replies = scaling_app.app.control.broadcast(
        "concurrent_update",
        arguments={"function": BURST, "bounds": bounds},
        destination=[node],
        reply=True,
        limit=1,
        timeout=30,
    )
    assert replies, "the node did not answer"
    return replies[0][node]


def test_burst_scales_up_at_once_never_above_the_limit_and_back_to_keep_warm(
    scaling_app, workers, rds
):
    node = start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    sent = publish_template(scaling_app.app, rds, BURST, ("b", 2.0), 400, "burst:b")
    # The whole burst waits in the queue at one instant, however slowly it was published.
    burst(rds, "burst:b", spec_of(scaling_app.burst).queue)
    # At once: all four containers run before the first input (two seconds) is done, while
    # the backlog still waits. A scaler that polled every few seconds, or started one
    # container per input served, would come after it. (How fast: bench_burst.)
    wait_for(lambda: len(containers_of(node.pid)) >= 4, 60, interval=0.02, what="4 containers")
    assert done(rds, "b") == 0
    most = 0

    def finished() -> bool:
        nonlocal most
        # Every container process, draining ones too, as fast as /proc shows them.
        most = max(most, len(containers_of(node.pid)))
        return done(rds, "b") >= 400

    wait_for(finished, 60, interval=0.02, what="the burst served")
    assert ResultSet(sent).get(timeout=30) == ["b"] * 400
    assert done(rds, "b") == 400
    assert most == 4
    assert int(rds.get("peak:b")) <= 200
    # Idle for container_idle_timeout (3 s): back to keep_warm, never below.
    wait_for(lambda: row(scaling_app, BURST)["containers"] == 1, 30, what="scale-down to 1")
    time.sleep(1)
    assert row(scaling_app, BURST)["containers"] == 1


def test_keep_warm_containers_run_before_any_input(scaling_app, workers):
    start_node(workers, WARM)
    wait_for(lambda: row(scaling_app, WARM)["ready"] == 2, 30, what="two warm containers")
    assert row(scaling_app, WARM)["backlog"] == 0


def test_keep_warm_zero_scales_to_zero_and_back_up_on_demand(scaling_app, workers, rds):
    start_node(workers, ZERO)
    time.sleep(1)
    assert row(scaling_app, ZERO)["containers"] == 0
    first = group(scaling_app.scale_to_zero.s("z1") for _ in range(20)).apply_async()
    assert first.get(timeout=30) == ["z1"] * 20
    wait_for(lambda: row(scaling_app, ZERO)["containers"] == 0, 30, what="scale to zero")
    second = group(scaling_app.scale_to_zero.s("z2") for _ in range(5)).apply_async()
    assert second.get(timeout=30) == ["z2"] * 5


def test_a_flood_of_one_function_never_delays_another(scaling_app, workers, rds):
    start_node(workers, BURST, OTHER)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    group(scaling_app.burst.s("flood", UNTIL_RELEASED) for _ in range(2000)).apply_async()
    wait_for(lambda: running(rds, "flood") >= 50, 30, what="the flood under way")
    # The flood's inputs hold their slots until released, and the rest of it waits in its
    # queue: the other function's input, behind none of them, runs on a container of its
    # own meanwhile. (How soon a cold function answers beside a flood: bench_reaction.)
    assert scaling_app.other.delay("one").get(timeout=30) == "one"
    rds.delete(spec_of(scaling_app.burst).queue)  # what still waits of the flood
    scaling_app.recorder.release("flood")


def test_scale_down_while_inputs_run_loses_nothing(scaling_app, workers, rds):
    start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    sent = 400
    result = group(scaling_app.burst.s("drain", UNTIL_RELEASED) for _ in range(sent)).apply_async()
    # Held until released: every container is full, 200 inputs in flight.
    wait_for(lambda: running(rds, "drain") == 200, 60, what="4 containers busy")
    # Lower the bound while every container is busy: three drain at once.
    assert "ok" in update(scaling_app, {"max_containers": 1})
    wait_for(lambda: row(scaling_app, BURST)["retiring"] == 3, 30, what="three draining")
    # What the draining containers hold finishes there; the rest runs on the one left.
    scaling_app.recorder.release("drain")
    wait_for(lambda: row(scaling_app, BURST)["containers"] == 1, 30, what="drain to 1")
    assert result.get(timeout=60) == ["drain"] * sent
    assert done(rds, "drain") == sent


def test_crash_looping_function_backs_off_and_others_keep_serving(scaling_app, workers):
    node = start_node(workers, CRASHY, OTHER)
    scaling_app.crashy.delay("never")
    wait_for(lambda: row(scaling_app, CRASHY)["crashes"] >= 3, 60, what="three crashes")
    crashes_then = row(scaling_app, CRASHY)["crashes"]
    assert row(scaling_app, CRASHY)["crash_loop"]
    assert "exit status 3" in row(scaling_app, CRASHY)["error"]
    for _ in range(3):
        assert scaling_app.other.delay("fine").get(timeout=30) == "fine"
    time.sleep(3)
    # Exponential back-off: a handful more attempts, not a fork bomb.
    assert row(scaling_app, CRASHY)["crashes"] - crashes_then <= 2
    assert "crashed (exit status 3)" in workers.log_of(node)


def test_sigkill_of_the_node_leaves_no_container_behind(scaling_app, workers):
    node = start_node(workers, WARM, BURST)
    wait_for(lambda: row(scaling_app, WARM)["ready"] == 2, 30, what="warm containers")
    group(scaling_app.burst.s("k", UNTIL_RELEASED) for _ in range(100)).apply_async()
    # Two warm containers, and the burst's keep_warm one plus one for its backlog.
    wait_for(lambda: len(containers_of(node.pid)) == 4, 60, what="four containers")
    family = descendants(node.pid)
    os.kill(node.pid, signal.SIGKILL)
    # Orphaned containers finish what they run (now released) and exit by themselves.
    scaling_app.recorder.release("k")
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_stopping_the_node_drains_every_container(scaling_app, workers, rds):
    node = start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    group(scaling_app.burst.s("stop", UNTIL_RELEASED) for _ in range(40)).apply_async()
    wait_for(lambda: running(rds, "stop") == 40, 60, what="40 running")
    family = descendants(node.pid)
    node.send_signal(signal.SIGTERM)
    workers.wait_for_log(node, "Warm shutdown", 30)
    # The inputs end only now, while the node shuts down: it waits for every one of them.
    scaling_app.recorder.release("stop")
    node.wait(60)
    assert done(rds, "stop") == 40
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive


@pytest.mark.parametrize("bad", [{"max_containers": 0}, {"min_containers": 9}, {"max_inputs": 3}])
def test_invalid_runtime_update_is_refused_and_changes_nothing(scaling_app, workers, bad):
    start_node(workers, BURST)
    wait_for(lambda: row(scaling_app, BURST)["ready"] == 1, 30, what="keep_warm container")
    answer = update(scaling_app, bad)
    key, value = next(iter(bad.items()))
    assert key in answer["error"] and repr(value) in answer["error"]
    current = row(scaling_app, BURST)
    assert (current["min_containers"], current["max_containers"]) == (1, 4)
