"""This node's status: a row per function, built from its pool, and its stats."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..contract import container_nodename
from ..status import FunctionStatus
from .devices import DeviceAllocator
from .pool import FunctionPool

if TYPE_CHECKING:
    from .cluster import ClusterScope, NodeScope


def function_status(
    pool: FunctionPool,
    hostname: str,
    devices: DeviceAllocator,
    placeable: bool,
    scope: dict[str, Any] | None = None,
) -> FunctionStatus:
    """The row ``concurrent status`` shows of ``pool`` on this node; ``scope`` adds what
    the node's scope knows (``ClusterScope.describe``)."""
    event = pool.last_event
    batch_sizes, batched_items = pool.batch_sizes()
    return FunctionStatus.of_spec(
        pool.spec,
        node=hostname,
        containers=pool.live,
        ready=sum(1 for c in pool.containers.values() if c.ready),
        retiring=len(pool.retiring),
        in_flight=pool.in_flight,
        backlog=pool.backlog,
        capacity=pool.live * pool.spec.target_items,
        crashes=pool.crashes,
        recycles=pool.recycles,
        crash_loop=pool.crash_looping,
        error=pool.last_error,
        scale_ups=pool.scale_ups,
        scale_downs=pool.scale_downs,
        last_event=None if event is None else event.describe(),
        last_event_at=None if event is None else event.wall,
        pids=sorted(c.process.pid or 0 for c in pool.containers.values()),
        gpu_devices=gpu_devices(pool, hostname, devices),
        placeable=placeable,
        batch_sizes=batch_sizes if pool.spec.max_batch_size else [],
        batched_items=batched_items,
        **(scope or {}),
    )


def node_rows(
    pools: Iterable[FunctionPool],
    hostname: str,
    devices: DeviceAllocator,
    scope: NodeScope | ClusterScope,
) -> list[dict[str, Any]]:
    """This node's rows, one per function it serves (each a :class:`FunctionStatus` dict)."""
    return [
        function_status(
            pool, hostname, devices, devices.placeable(pool.spec), scope.describe(pool)
        ).as_dict()
        for pool in pools
    ]


def gpu_devices(
    pool: FunctionPool, hostname: str, devices: DeviceAllocator
) -> dict[str, list[str]]:
    """The devices each container (running or draining) holds, by container node name."""
    held = {}
    for ident in [*pool.containers, *pool.retiring]:
        placement = devices.held(ident)
        if placement is not None:
            name = container_nodename(pool.spec, ident, hostname)
            held[name] = [d.id for d in placement.devices]
    return held


def node_stats(
    node_max_containers: int,
    poll_interval: float,
    devices: DeviceAllocator,
    *,
    cpu_share: float,
    turns: int,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``concurrent`` section of the node's ``inspect stats`` reply."""
    return {
        "node_max_containers": node_max_containers,
        "gpus": [str(d) for d in devices.devices],
        "gpus_free": [d.id for d in devices.free],
        "poll_interval": poll_interval,
        "supervisor_cpu_share": round(cpu_share, 4),
        "turns": turns,
        "functions": rows,
    }
