"""The supervisor's side of GPUs, turn by turn, with a fake launcher and a fake backlog.

What each container is given, when devices come back, and how ``concurrent status``
merges what the nodes say. Real nodes and containers are in ``test_gpu_nodes.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from celery_concurrent import FunctionSpec
from celery_concurrent.cli import merge_status
from celery_concurrent.contract import LoadReport
from celery_concurrent.supervisor.gpus import GpuDevice, parse_gpu_override
from celery_concurrent.supervisor.supervisor import Supervisor

from .fakes import FakeLauncher, FakeProbe, fake_node

TWO_A100 = parse_gpu_override("0:A100,1:A100")


def make_spec(gpu: Any, **settings: Any) -> FunctionSpec:
    return FunctionSpec.from_options("proj.embed", {"gpu": gpu, **settings})


@pytest.fixture
def node() -> Iterator[Any]:
    """Make a supervisor with fakes around it; every one made is torn down at the end."""
    with ExitStack() as stack:

        def make(
            specs: list[FunctionSpec], gpus: tuple[GpuDevice, ...] = TWO_A100
        ) -> tuple[Supervisor, FakeLauncher, FakeProbe]:
            made = stack.enter_context(fake_node(specs, gpus, nodename="gpu@host"))
            return made.supervisor, made.launcher, made.probe

        yield make


def visible(launcher: FakeLauncher) -> list[str]:
    return [launch.env["CUDA_VISIBLE_DEVICES"] for launch in launcher.launches]


def report_idle(supervisor: Supervisor, now: float) -> None:
    for pool in supervisor.pools.values():
        for container in pool.containers.values():
            pid = container.process.pid or 0
            container.report = LoadReport(container.ident, pid, 0, busy_at=now - 100)


def test_each_container_gets_its_own_device_and_no_more_containers_than_devices(node):
    spec = make_spec("A100", max_inputs=2, max_containers=4)
    supervisor, launcher, probe = node([spec])
    probe.backlog_of[spec.queue] = 100
    supervisor.turn(0.0)
    supervisor.turn(0.1)
    assert visible(launcher) == ["0", "1"]
    assert all(launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for launch in launcher.launches)
    assert [launch.ident for launch in launcher.launches] == ["gpu-1", "gpu-2"]
    (row,) = supervisor.status()
    assert row["containers"] == 2
    assert row["placeable"] is True
    assert row["gpu"] == ["A100"]
    assert row["gpu_devices"] == {
        "proj.embed-gpu-1@host": ["0"],
        "proj.embed-gpu-2@host": ["1"],
    }
    assert supervisor.stats()["gpus_free"] == []


def test_a_two_device_function_gets_both_devices_in_one_container(node):
    spec = make_spec("A100:2", max_inputs=1)
    supervisor, launcher, probe = node([spec])
    probe.backlog_of[spec.queue] = 10
    supervisor.turn(0.0)
    supervisor.turn(0.1)
    assert visible(launcher) == ["0,1"]


def test_a_crashed_container_frees_its_devices_for_the_next_one(node):
    spec = make_spec("A100", max_containers=4)
    supervisor, launcher, probe = node([spec])
    probe.backlog_of[spec.queue] = 10
    supervisor.turn(0.0)
    launcher.processes[0].code = -9  # the container on device 0 dies
    supervisor.turn(0.1)
    assert [d.id for d in supervisor.devices.free] == ["0"]
    supervisor.turn(5.0)  # after the crash back-off
    assert visible(launcher) == ["0", "1", "0"]
    assert supervisor.devices.free == ()


def test_a_retired_container_keeps_its_devices_until_it_has_drained(node):
    spec = make_spec("A100", max_containers=4, scaledown_window=1)
    supervisor, launcher, probe = node([spec])
    probe.backlog_of[spec.queue] = 10
    supervisor.turn(0.0)
    probe.backlog_of[spec.queue] = 0
    report_idle(supervisor, 10.0)
    supervisor.turn(10.0)
    assert all(p.terminated for p in launcher.processes)
    assert supervisor.devices.free == ()  # still draining: the devices are still in use
    assert len(supervisor.status()[0]["gpu_devices"]) == 2
    for process in launcher.processes:
        process.code = 0
    supervisor.turn(10.1)
    assert [d.id for d in supervisor.devices.free] == ["0", "1"]
    assert supervisor.status()[0]["gpu_devices"] == {}


def test_gpu_functions_share_the_devices_and_never_hold_one_twice(node):
    embed = make_spec("A100", max_containers=4)
    shard = FunctionSpec.from_options("proj.shard", {"gpu": "any"})
    supervisor, launcher, probe = node([embed, shard])
    probe.backlog_of[embed.queue] = 1
    probe.backlog_of[shard.queue] = 10
    supervisor.turn(0.0)
    assert sorted(visible(launcher)) == ["0", "1"]
    assert supervisor.devices.free == ()


@pytest.mark.parametrize("gpus", [(), parse_gpu_override("0:A100,1:A100")], ids=["cpu", "a100"])
def test_a_node_without_the_devices_starts_nothing_and_says_so(node, gpus):
    spec = make_spec("H100", min_containers=1)
    supervisor, launcher, probe = node([spec], gpus=gpus)
    probe.backlog_of[spec.queue] = 5
    supervisor.turn(0.0)
    assert launcher.launches == []
    (row,) = supervisor.status()
    assert row["placeable"] is False
    assert row["backlog"] == 5
    assert row["containers"] == 0 and row["crashes"] == 0


def test_a_function_the_node_cannot_place_takes_no_share_of_the_node(node):
    fetch = FunctionSpec.from_options("proj.fetch", {})
    parse = FunctionSpec.from_options("proj.parse", {})
    train = make_spec("H100")
    supervisor, launcher, probe = node([fetch, parse, train], gpus=())
    supervisor.settings.node_max_containers = 4
    probe.backlog_of[train.queue] = 5
    probe.backlog_of[fetch.queue] = 100
    supervisor.turn(0.0)
    probe.backlog_of[parse.queue] = 100
    supervisor.turn(0.1)
    # Two busy functions share the node's 4: parse gets its half at once.
    assert [launch.spec.name for launch in launcher.launches].count("proj.parse") == 2


def test_cpu_functions_on_a_gpu_node_see_no_device(node):
    # Otherwise a CPU container could touch the devices that GPU containers hold.
    spec = FunctionSpec.from_options("proj.fetch", {"max_containers": 1})
    supervisor, launcher, probe = node([spec])
    probe.backlog_of[spec.queue] = 1
    supervisor.turn(0.0)
    assert [launch.env for launch in launcher.launches] == [{"CUDA_VISIBLE_DEVICES": ""}]
    assert supervisor.status()[0]["gpu"] is None


# --- concurrent status: merging what the nodes say ---------------------------------------


def status_of(*rows_by_node: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return merge_status({node: {"functions": [row]} for node, row in rows_by_node})


def node_row(gpu: list[str] | None, placeable: bool, devices: dict[str, list[str]]):
    return {
        "function": "proj.train",
        "queue": "concurrent.gpu.proj.train",
        "containers": len(devices),
        "ready": len(devices),
        "retiring": 0,
        "in_flight": 0,
        "backlog": 3,
        "capacity": 0,
        "crashes": 0,
        "crash_loop": False,
        "error": None,
        "scale_ups": 0,
        "scale_downs": 0,
        "last_event": None,
        "last_event_at": None,
        "min_containers": 0,
        "max_containers": None,
        "gpu": gpu,
        "gpu_devices": devices,
        "placeable": placeable,
    }


def test_a_function_no_node_can_place_shows_as_unplaceable():
    (row,) = status_of(
        ("cpu@host", node_row(["H100"], False, {})),
        ("gpu@host", node_row(["H100"], False, {})),
    )
    assert row["error"] == "unplaceable: no node has an H100"
    assert row["placeable"] is False
    assert row["backlog"] == 3


def test_a_function_one_node_can_place_is_not_unplaceable():
    (row,) = status_of(
        ("cpu@host", node_row(["A100"], False, {})),
        ("gpu@host", node_row(["A100"], True, {"proj.train-gpu-1@host": ["0"]})),
    )
    assert row["error"] is None
    assert row["placeable"] is True
    assert row["gpu_devices"] == {"proj.train-gpu-1@host": ["0"]}
    assert row["nodes"] == ["cpu@host", "gpu@host"]
