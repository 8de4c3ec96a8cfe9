"""The status of a function: one typed row, built by a node, merged over every node.

A node's supervisor answers ``concurrent_status`` with one :class:`FunctionStatus` per
function it serves; ``celery concurrent status`` merges the rows of every node that
answers with :func:`merge`, and gives every function no node serves a row of its own
(:meth:`FunctionStatus.unserved`). ``status --json`` prints :meth:`FunctionStatus.as_dict`,
whose keys are stable for scripts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .gpu import parse_gpu, unplaceable_reason
from .spec import FunctionSpec

UNSERVED_ERROR = "no node supervises it"


@dataclass
class FunctionStatus:
    """One function's pool, on one node or (merged) on every node that serves it.

    How :func:`merge` combines the rows of several nodes, field by field: the counts
    (``containers`` to ``scale_downs``), ``batch_sizes`` and ``batched_items`` add up;
    ``backlog`` is the largest (every node
    reads the same queue, some a moment later); ``crash_loop``, ``placeable`` and
    ``spec_conflict`` hold if they hold on any node; ``error`` is the first node's; the
    bounds are the strictest (the lowest ``max_containers``: what the cluster holds) and
    nodes that disagree on them set ``spec_conflict``; ``cluster_containers`` is the most
    any node counted; ``scope`` is the nodes' if they agree, else ``mixed``;
    ``last_event`` is the newest; ``pids``, ``gpu_devices`` and ``nodes`` gather every
    node's, and ``per_node`` keeps each node's own counts.
    """

    function: str
    queue: str
    #: the host name of the node (merged: of every node, comma-separated)
    node: str | None = None
    containers: int = 0
    ready: int = 0
    retiring: int = 0
    min_containers: int = 0
    max_containers: int | None = None
    max_inputs: int = 1
    target_inputs: int = 1
    buffer_containers: int = 0
    scaledown_window: float = 0.0
    in_flight: int = 0
    #: ``None`` while the broker cannot be read (or no node reads it)
    backlog: int | None = None
    capacity: int = 0
    crashes: int = 0
    #: containers that recycled themselves: an input overran its ``time_limit``
    recycles: int = 0
    crash_loop: bool = False
    error: str | None = None
    scale_ups: int = 0
    scale_downs: int = 0
    last_event: str | None = None
    last_event_at: float | None = None
    pids: list[int] = field(default_factory=list)
    gpu: list[str] | None = None
    gpu_devices: dict[str, list[str]] = field(default_factory=dict)
    placeable: bool = True
    #: the node names (``celery@host``) whose rows were merged into this one
    nodes: list[str] = field(default_factory=list)
    #: each node's own counts, by node name
    per_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: where the bounds hold: ``cluster`` (over every node), ``node``, or ``mixed``
    scope: str = "node"
    #: the function's containers over the cluster, by their leases (cluster scope)
    cluster_containers: int | None = None
    #: nodes run the function with different settings (a rolling deploy): the
    #: strictest bound holds
    spec_conflict: bool = False
    #: the node can reach the Redis that holds the leases (cluster scope)
    coordination_reachable: bool = True
    #: containers that lost their lease (cut off from Redis, or the limit taken by
    #: others after a Redis restart) and drained
    leases_lost: int = 0
    #: inputs of lost nodes that were given back to the queue (cluster scope)
    swept: int = 0
    #: a ``@batched`` function's settings (``None`` for one without batches)
    max_batch_size: int | None = None
    wait_ms: int | None = None
    #: its batches since the nodes started, per bucket of ``BATCH_SIZE_BUCKETS`` (not
    #: cumulative; the last bucket is 1000), and the items they held
    batch_sizes: list[int] = field(default_factory=list)
    batched_items: int = 0

    @property
    def batches(self) -> int:
        return sum(self.batch_sizes)

    @property
    def batch_size_mean(self) -> float | None:
        """The mean items per batch, or ``None`` before the first batch."""
        return round(self.batched_items / self.batches, 2) if self.batches else None

    @classmethod
    def unserved(cls, spec: FunctionSpec) -> FunctionStatus:
        """The row of a function that no node answering serves."""
        return cls.of_spec(spec, error=UNSERVED_ERROR)

    @classmethod
    def of_spec(cls, spec: FunctionSpec, **fields: Any) -> FunctionStatus:
        """A row with the function's names and bounds from ``spec``, and ``fields``."""
        return cls(
            function=spec.name,
            queue=spec.queue,
            min_containers=spec.min_containers,
            max_containers=spec.max_containers,
            max_inputs=spec.max_inputs,
            target_inputs=spec.target_inputs,
            buffer_containers=spec.buffer_containers,
            scaledown_window=spec.scaledown_window,
            gpu=spec.as_dict()["gpu"],
            max_batch_size=spec.max_batch_size,
            wait_ms=spec.wait_ms,
            **fields,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FunctionStatus:
        """Parse a row as a node sent it; keys this version does not know are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["batches"] = self.batches
        data["batch_size_mean"] = self.batch_size_mean
        return data

    def node_view(self) -> dict[str, Any]:
        """What :attr:`per_node` keeps of one node's row."""
        keys = (
            "containers",
            "ready",
            "retiring",
            "in_flight",
            "crashes",
            "error",
            "pids",
            "scope",
            "max_containers",
            "min_containers",
            "coordination_reachable",
        )
        return {key: getattr(self, key) for key in keys}


#: the fields that add up over nodes
SUMMED = (
    "containers",
    "ready",
    "retiring",
    "in_flight",
    "capacity",
    "crashes",
    "recycles",
    "scale_ups",
    "scale_downs",
    "leases_lost",
    "swept",
    "batched_items",
)


def merge(
    replies: Mapping[str, Iterable[FunctionStatus]], specs: Iterable[FunctionSpec] = ()
) -> list[FunctionStatus]:
    """One row per function over every node's rows (``replies`` by node name), sorted by
    function; each spec that no node serves gets :meth:`FunctionStatus.unserved`."""
    merged: dict[str, FunctionStatus] = {}
    for nodename, rows in sorted(replies.items()):
        for row in rows:
            into = merged.get(row.function)
            if into is None:
                merged[row.function] = into = dataclasses.replace(
                    row,
                    pids=[],
                    gpu_devices={},
                    nodes=[],
                    per_node={},
                    node=None,
                    batch_sizes=[],
                )
                for key in SUMMED:
                    setattr(into, key, 0)
            _add(into, row, nodename)
    for row in merged.values():
        if row.gpu and not row.placeable:
            # Every node that answered serves it, and none has the devices it asks for.
            row.error = unplaceable_reason(parse_gpu(row.gpu) or ())
    for spec in specs:
        merged.setdefault(spec.name, FunctionStatus.unserved(spec))
    return [merged[name] for name in sorted(merged)]


def _add(into: FunctionStatus, row: FunctionStatus, nodename: str) -> None:
    first = not into.nodes
    into.nodes.append(nodename)
    into.per_node[nodename] = row.node_view()
    hosts = [h for h in (into.node or "").split(",") if h]
    if row.node and row.node not in hosts:
        into.node = ",".join([*hosts, row.node])
    for key in SUMMED:
        setattr(into, key, getattr(into, key) + getattr(row, key))
    if row.batch_sizes:
        width = max(len(into.batch_sizes), len(row.batch_sizes))
        mine, theirs = (
            [*sizes, *[0] * (width - len(sizes))] for sizes in (into.batch_sizes, row.batch_sizes)
        )
        into.batch_sizes = [a + b for a, b in zip(mine, theirs, strict=True)]
    if row.backlog is not None:
        into.backlog = row.backlog if into.backlog is None else max(into.backlog, row.backlog)
    into.crash_loop = into.crash_loop or row.crash_loop
    into.error = into.error or row.error
    _merge_bounds(into, row, first)
    into.placeable = row.placeable if first else into.placeable or row.placeable
    into.pids = sorted([*into.pids, *row.pids])
    into.gpu_devices = {**into.gpu_devices, **row.gpu_devices}
    if (row.last_event_at or 0) > (into.last_event_at or 0):
        into.last_event, into.last_event_at = row.last_event, row.last_event_at


def _merge_bounds(into: FunctionStatus, row: FunctionStatus, first: bool) -> None:
    """Nodes that disagree on a function's bounds: flag it, and show what holds."""
    if first:
        return
    bounds = (
        "min_containers",
        "max_containers",
        "max_inputs",
        "target_inputs",
        "max_batch_size",
        "wait_ms",
    )
    if any(getattr(into, key) != getattr(row, key) for key in bounds):
        into.spec_conflict = True
    limits = [m for m in (into.max_containers, row.max_containers) if m is not None]
    into.max_containers = min(limits) if limits else None
    if into.scope != row.scope:
        into.scope = "mixed"
    if row.cluster_containers is not None:
        into.cluster_containers = max(into.cluster_containers or 0, row.cluster_containers)
    into.spec_conflict = into.spec_conflict or row.spec_conflict
    into.coordination_reachable = into.coordination_reachable and row.coordination_reachable
