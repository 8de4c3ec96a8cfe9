"""GPU functions on real nodes: placement, one device set per container, unplaceable.

Two nodes on one machine and one private Redis: ``cpu@host`` (``--gpus ""``) and
``gpu@host``, which simulates two A100s (``--gpus "0:A100,1:A100"``). Every input reports
the ``CUDA_VISIBLE_DEVICES`` its container was given and the container's node name.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import pytest
from celery import group

from celery_concurrent.cli import collect_status
from celery_concurrent.supervisor.gpus import GPUS_ENV

from .apps.measure import UNTIL_RELEASED
from .support import ANSWER_TIMEOUTS, ROOT, running, wait_for

APP = "tests.apps.gpu"
EMBED = f"{APP}.embed"
SHARD = f"{APP}.shard"
TRAIN = f"{APP}.train"
HOST = socket.gethostname()
CPU_NODE = f"cpu@{HOST}"
GPU_NODE = f"gpu@{HOST}"
NODE_GPUS = {CPU_NODE: "", GPU_NODE: "0:A100,1:A100"}
FAST_START = ("-c", "1", "--without-mingle", "--without-gossip")


def start_nodes(workers, function: str, *nodes: str) -> dict[str, Any]:
    procs = {
        node: workers.start(
            APP,
            *FAST_START,
            "-n",
            node,
            "--gpus",
            NODE_GPUS[node],
            "--concurrent-functions",
            function,
            wait_ready=False,
        )
        for node in nodes
    }
    for proc in procs.values():
        workers.wait_for_log(proc, " ready.", 60)
    return procs


def node_row(app, node: str, function: str) -> dict[str, Any]:
    """What one node alone says of ``function``."""
    for timeout in ANSWER_TIMEOUTS:
        replies = app.app.control.broadcast(
            "concurrent_status", reply=True, timeout=timeout, limit=1, destination=[node]
        )
        for reply in replies or []:
            for row in reply.get(node, {}).get("functions", []):
                if row["function"] == function:
                    return row
    raise AssertionError(f"{node} did not report {function}")


def merged_row(app, function: str) -> dict[str, Any]:
    """What ``concurrent status`` says of ``function``, once both nodes have answered."""
    for timeout in ANSWER_TIMEOUTS:
        for row in collect_status(app.app, timeout=timeout):
            if row["function"] == function and len(row["nodes"]) == 2:
                return row
    raise AssertionError(f"both nodes did not report {function}")


def test_an_a100_function_runs_only_on_the_gpu_node_one_device_per_container(gpu_app, workers):
    procs = start_nodes(workers, EMBED, CPU_NODE, GPU_NODE)
    result = group(gpu_app.embed.s("e", UNTIL_RELEASED) for _ in range(16)).apply_async()
    most = 0

    def placed_on_the_gpu_node_only() -> None:
        nonlocal most
        gpu = node_row(gpu_app, GPU_NODE, EMBED)
        most = max(most, gpu["containers"] + gpu["retiring"])
        held = [device for devices in gpu["gpu_devices"].values() for device in devices]
        assert len(held) == len(set(held)), gpu["gpu_devices"]  # no device held twice
        cpu = node_row(gpu_app, CPU_NODE, EMBED)
        assert cpu["containers"] == 0 and cpu["scale_ups"] == 0, cpu

    def both_devices_busy() -> bool:
        placed_on_the_gpu_node_only()
        return running(gpu_app.recorder.store(), "e") == 4

    # Held until released: both containers (two inputs each) fill, however slowly.
    wait_for(both_devices_busy, 60, interval=0.05, what="both GPU containers full")
    gpu_app.recorder.release("e")
    while not result.ready():
        placed_on_the_gpu_node_only()
    seen = result.get(timeout=30)

    devices_of = defaultdict(set)
    for answer in seen:
        devices_of[answer["container"]].add(answer["devices"])
    # Every input ran on the GPU node's containers, each of which saw one device of its own.
    gpu_container = re.compile(rf"{re.escape(EMBED)}-gpu-\d+@{re.escape(HOST)}")
    assert all(gpu_container.fullmatch(name) for name in devices_of), devices_of
    assert all(len(devices) == 1 for devices in devices_of.values()), devices_of
    assert sorted(d for devices in devices_of.values() for d in devices) == ["0", "1"]
    assert len(devices_of) == 2
    assert most == 2  # the limit is 4; the node has 2 A100s

    cpu = node_row(gpu_app, CPU_NODE, EMBED)
    assert (cpu["placeable"], cpu["scale_ups"], cpu["crashes"]) == (False, 0, 0)
    assert "embed-cpu-" not in workers.log_of(procs[CPU_NODE])
    merged = merged_row(gpu_app, EMBED)
    assert merged["error"] is None
    assert merged["queue"] == f"concurrent.gpu.{EMBED}"


def test_a_two_device_function_gets_both_devices_in_one_container(gpu_app, workers):
    start_nodes(workers, SHARD, GPU_NODE)
    first = wait_for(
        lambda: (row := node_row(gpu_app, GPU_NODE, SHARD))["ready"] == 1 and row,
        30,
        what="the keep_warm container",
    )
    name = f"{SHARD}-gpu-1@{HOST}"
    assert first["gpu_devices"] == {name: ["0", "1"]}
    answers = group(gpu_app.shard.s("s", 0.3) for _ in range(3)).apply_async()
    while not answers.ready():
        assert node_row(gpu_app, GPU_NODE, SHARD)["containers"] == 1
    assert answers.get(timeout=30) == [{"devices": "0,1", "container": name}] * 3

    # A crashed container gives its devices back: its replacement gets both again.
    os.kill(first["pids"][0], signal.SIGKILL)
    wait_for(
        lambda: (
            (row := node_row(gpu_app, GPU_NODE, SHARD))["crashes"] == 1
            and row["ready"] == 1
            and row["pids"] != first["pids"]
        ),
        30,
        what="a replacement container",
    )
    assert node_row(gpu_app, GPU_NODE, SHARD)["gpu_devices"] == {name: ["0", "1"]}
    assert gpu_app.shard.delay("s").get(timeout=30)["devices"] == "0,1"


def test_a_function_no_node_can_place_shows_as_unplaceable_and_its_inputs_wait(
    gpu_app, workers, rds
):
    procs = start_nodes(workers, TRAIN, CPU_NODE, GPU_NODE)
    queue = f"concurrent.gpu.{TRAIN}"
    for _ in range(3):
        # No result is awaited: none will come while no node has an H100.
        gpu_app.train.apply_async(("t",), ignore_result=True)
    row = wait_for(
        lambda: (row := merged_row(gpu_app, TRAIN))["backlog"] == 3 and row, 30, what="backlog 3"
    )
    assert row["error"] == "unplaceable: no node has an H100"
    assert (row["containers"], row["crashes"], row["placeable"]) == (0, 0, False)
    time.sleep(0.5)  # many supervisor turns: still nothing takes them
    assert rds.llen(queue) == 3
    assert all(proc.poll() is None for proc in procs.values())


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        pytest.param(("--gpus", "0A100"), {}, "--gpus='0A100'", id="option"),
        pytest.param(
            (), {"CELERY_CONCURRENT_GPUS": "0A100"}, "CELERY_CONCURRENT_GPUS='0A100'", id="env"
        ),
    ],
)
def test_a_malformed_gpus_override_stops_the_node_with_a_clear_error(workers, args, env, named):
    proc = workers.start(APP, *FAST_START, *args, env=env, wait_ready=False)
    proc.wait(30)
    assert proc.returncode != 0
    log = workers.log_of(proc)
    assert named in log, log[-2000:]
    assert "INDEX:MODEL" in log


def test_the_real_gpu_check_says_so_and_claims_nothing_without_a_gpu():
    from benchmarks.gpu_check import NO_GPU_EXIT  # its app is made only for this test

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop(GPUS_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == NO_GPU_EXIT, done.stderr
    assert "NO GPU" in done.stderr and "Nothing was checked" in done.stderr
    assert done.stdout == ""
