"""The scaling policy: pure functions from observations to a decision.

Read top to bottom it is the whole rule:

* a function the node cannot place (a GPU it lacks), or whose backlog cannot be read
  (the broker is unreachable), gets no decision: what runs keeps running;
* the function's containers are this node's and, in cluster scope, every other node's
  (``elsewhere``, as their leases show them): the bounds and the demand are the
  function's over the whole cluster;
* ``demand = backlog + in_flight`` of every container;
* ``desired = ceil(demand / target_items)`` (``target_inputs``, times ``max_batch_size``
  for a ``@batched`` function: a slot runs a batch), plus ``buffer_containers`` while busy,
  clamped to ``[min_containers, max_containers]``;
* this node may hold at most its capacity: the function's share of the node
  (:func:`node_share`: every busy function may use its fair share even when others fill
  the node, so a flood of one never starves another) and, for a GPU function, what its
  free devices can hold (:func:`device_capacity`);
* start the difference at once when ``desired`` exceeds the containers, as many as the
  node has room for, unless the function is backing off after crashes
  (:func:`crash_backoff`); in cluster scope each start must first win a lease, so nodes
  that decide at once never start more than ``desired`` between them, and each node
  starts at most its share of the difference (``ceil(difference / peers)``) per turn,
  so that the nodes race fairly and the containers spread over them;
* retire only containers idle for ``scaledown_window``, most idle first over the
  cluster, never below ``desired`` (which is never below ``min_containers``); a node
  retires those of its own that are chosen;
* above ``max_containers`` (after a runtime update lowered it) or the node's capacity
  (when other functions claim their share) drain the surplus at once, least busy first,
  leaving containers still starting for a later decision. Retiring always drains: no
  input is cut off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..constants import BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS
from ..spec import FunctionSpec


@dataclass(frozen=True)
class ContainerState:
    """What the supervisor knows of one live container."""

    ident: str
    in_flight: int = 0
    #: seconds since the container last had an input in flight; 0 while busy
    idle_for: float = 0.0
    #: still starting: counts as capacity, but cannot be retired yet
    starting: bool = False


@dataclass(frozen=True)
class Observation:
    """Everything the policy looks at for one function, at one instant."""

    spec: FunctionSpec
    #: inputs waiting in the function's queue; ``None`` when the broker cannot be read
    backlog: int | None
    containers: tuple[ContainerState, ...] = ()
    #: the most containers of this function the node can hold now (node bound, devices)
    node_capacity: int | None = None
    #: whether this node could ever run a container of it (a GPU function needs devices)
    placeable: bool = True
    #: the function crashed lately and waits before its next start
    backing_off: bool = False
    #: its containers on other nodes (cluster scope), as their leases show them
    elsewhere: tuple[ContainerState, ...] = ()
    #: the nodes that serve it and could place a container, this one included: each
    #: takes its share of a scale-up per turn, so that the containers spread
    peers: int = 1

    @property
    def everywhere(self) -> tuple[ContainerState, ...]:
        return (*self.containers, *self.elsewhere)

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.everywhere)


@dataclass(frozen=True)
class Decision:
    """What to do now: start ``start`` containers and retire those in ``retire``.

    ``desired`` is what the node aims at; ``cluster_desired`` the function's number over
    every node (the same in node scope): the limit a start's lease is admitted under, and
    the number an idle container's release keeps.
    """

    desired: int
    start: int = 0
    retire: tuple[str, ...] = ()
    reason: str = ""
    #: no decision was taken (nothing observed to decide on): keep what runs
    held: bool = False
    cluster_desired: int | None = None
    #: the idle ones among ``retire``: each goes only if its release keeps
    #: ``cluster_desired`` over the cluster (another node may have retired one meanwhile)
    releases: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        return bool(self.start or self.retire)


@dataclass(frozen=True)
class Retirement:
    """The containers a decision retires, by cause."""

    #: above the upper bound: drained at once, least busy first
    over_bound: tuple[str, ...] = ()
    #: idle for ``scaledown_window``, most idle first
    idle: tuple[str, ...] = ()

    @property
    def idents(self) -> tuple[str, ...]:
        return (*self.over_bound, *self.idle)


def decide(obs: Observation) -> Decision:
    """The scaling decision for one function."""
    live = len(obs.containers)
    if obs.backlog is None:
        return Decision(live, reason="broker unreachable: keeping what runs", held=True)
    if not obs.placeable:
        return Decision(live, reason="this node cannot place it", held=True)
    total = len(obs.everywhere)
    demand = obs.backlog + obs.in_flight
    demanded_containers = _containers_for(obs.spec, demand)
    buffered_containers = _apply_buffer(obs.spec, demand, demanded_containers)
    desired = _apply_bounds(obs.spec, buffered_containers)
    here = _here(obs, desired)
    capacity = total * obs.spec.target_items
    load = f"backlog {obs.backlog}, in flight {obs.in_flight}, capacity {capacity}"
    share = math.ceil((desired - total) / max(1, obs.peers))
    start = min(desired - total, here - live, share)
    if start > 0:
        if obs.backing_off:
            why = "backing off after a crash"
            return Decision(here, reason=_joined(load, why), cluster_desired=desired)
        why = _why_start(obs, demand, buffered_containers, desired, here)
        return Decision(here, start=start, reason=_joined(load, why), cluster_desired=desired)
    chosen = _retirable(obs, desired)
    if chosen.idents:
        return Decision(
            here,
            retire=chosen.idents,
            reason=_joined(load, _why_retire(obs, chosen)),
            cluster_desired=desired,
            releases=chosen.idle,
        )
    return Decision(here, reason=load, cluster_desired=desired)


def _here(obs: Observation, desired: int) -> int:
    """How many of the ``desired`` containers this node aims to hold."""
    mine = max(0, desired - len(obs.elsewhere))
    return mine if obs.node_capacity is None else min(mine, obs.node_capacity)


def _joined(reason: str, why: str) -> str:
    return f"{reason}; {why}" if why else reason


def _why_start(obs: Observation, demand: int, wanted: int, desired: int, here: int) -> str:
    """What besides the demand set the number: a bound or the buffer (demand needs none)."""
    spec = obs.spec
    if desired > wanted:
        return f"min_containers {spec.min_containers}"
    if desired < wanted and (obs.node_capacity is None or desired <= obs.node_capacity):
        return f"max_containers {desired}"
    if here < wanted and here == obs.node_capacity:
        return f"node capacity {here}"
    if spec.buffer_containers and demand > 0:
        return f"buffer_containers {spec.buffer_containers}"
    return ""


def _why_retire(obs: Observation, chosen: Retirement) -> str:
    notes = []
    if chosen.over_bound:
        upper = upper_bound(obs.spec, obs.node_capacity)
        cluster_over = (
            obs.spec.max_containers is not None and len(obs.everywhere) > obs.spec.max_containers
        )
        if cluster_over:
            notes.append(f"above max_containers {obs.spec.max_containers}")
        elif upper is not None:
            notes.append(f"above node capacity {upper}")
    if chosen.idle:
        notes.append(f"idle for scaledown_window {obs.spec.scaledown_window:g}s")
    return "; ".join(notes)


def _containers_for(spec: FunctionSpec, demand: int) -> int:
    return math.ceil(demand / spec.target_items)


def _apply_buffer(spec: FunctionSpec, demand: int, desired: int) -> int:
    return desired + spec.buffer_containers if demand > 0 else desired


def upper_bound(spec: FunctionSpec, node_capacity: int | None) -> int | None:
    """The most containers the function may have on a node: its own limit and the node's."""
    bounds = [b for b in (spec.max_containers, node_capacity) if b is not None]
    return min(bounds) if bounds else None


def _apply_bounds(spec: FunctionSpec, desired: int) -> int:
    desired = max(desired, spec.min_containers)
    return desired if spec.max_containers is None else min(desired, spec.max_containers)


def _least_busy(containers: Sequence[ContainerState]) -> list[ContainerState]:
    # A starting container cannot be retired yet; it drains on a later decision.
    return sorted(
        (c for c in containers if not c.starting),
        key=lambda c: (c.in_flight, -c.idle_for, c.ident),
    )


def _retirable(obs: Observation, desired: int) -> Retirement:
    """What to retire, chosen over the cluster; only this node's containers are named."""
    everywhere = obs.everywhere
    mine = {c.ident for c in obs.containers}
    limit = obs.spec.max_containers
    forced = _least_busy(everywhere)[: max(0, len(everywhere) - limit)] if limit else []
    if obs.node_capacity is not None:
        forced_here = sum(c.ident in mine for c in forced)
        over_node = len(obs.containers) - obs.node_capacity - forced_here
        rest = [c for c in _least_busy(obs.containers) if c not in forced]
        forced += rest[: max(0, over_node)]
    window = obs.spec.scaledown_window
    idle = sorted(
        (
            c
            for c in everywhere
            if c not in forced and not c.starting and c.in_flight == 0 and c.idle_for >= window
        ),
        key=lambda c: (-c.idle_for, c.ident),
    )
    surplus = len(everywhere) - desired - len(forced)
    return Retirement(
        over_bound=tuple(c.ident for c in forced if c.ident in mine),
        idle=tuple(c.ident for c in idle[: max(0, surplus)] if c.ident in mine),
    )


# -- the node's share, the devices, the crashes -----------------------------------------


@dataclass(frozen=True)
class FunctionLoad:
    """What the node's fair share looks at of one function it serves."""

    live: int = 0
    backlog: int = 0
    placeable: bool = True

    @property
    def busy(self) -> bool:
        """Running containers, or inputs waiting that this node could run."""
        return bool(self.live or (self.backlog and self.placeable))


def node_share(bound: int, function: str, loads: Mapping[str, FunctionLoad]) -> int:
    """The most containers of ``function`` the node's ``bound`` leaves room for now.

    Every busy function (and the one asking) may use its fair share, ``bound`` divided
    among them and at least one, even when others fill the node: the others then drain
    down to theirs. Beyond its fair share a function may take whatever room is free.
    """
    others_live = sum(load.live for name, load in loads.items() if name != function)
    busy = sum(1 for name, load in loads.items() if name == function or load.busy)
    fair_share = max(1, bound // max(busy, 1))
    free_room = bound - others_live
    return max(fair_share, free_room)


def device_capacity(share: int, live: int, free_slots: int | None) -> int:
    """Clamp a GPU function's share to what its devices can hold.

    Running containers keep their devices; only the free ones (``free_slots`` more
    containers) bound new containers. ``None`` for a CPU function: no clamp.
    """
    return share if free_slots is None else min(share, live + free_slots)


def crash_backoff(consecutive_crashes: int) -> float:
    """Seconds to wait before the next start after a streak of crashes: 1, 2, 4, ... 60."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, consecutive_crashes - 1))
