"""The scaling policy: pure functions from observations to a decision.

Read top to bottom it is the whole rule:

* a function the node cannot place (a GPU it lacks), or whose backlog cannot be read
  (the broker is unreachable), gets no decision: what runs keeps running;
* ``demand = backlog + in_flight``;
* ``desired = ceil(demand / target_inputs)``, plus ``buffer_containers`` while busy;
* clamped to ``[min_containers, min(max_containers, node capacity)]``, where the node
  capacity is the function's share of the node (:func:`node_share`: every busy function
  may use its fair share even when others fill the node, so a flood of one never starves
  another) and, for a GPU function, what its free devices can hold
  (:func:`device_capacity`);
* start the difference at once when ``desired`` exceeds the live containers, unless the
  function is backing off after crashes (:func:`crash_backoff`);
* retire only containers idle for ``scaledown_window``, most idle first, never below
  ``desired`` (which is never below ``min_containers``);
* above the upper bound (after a runtime update lowered it, or when other functions
  claim their share) drain the surplus at once, least busy first, leaving containers
  still starting for a later decision. Retiring always drains: no input is cut off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.containers)


@dataclass(frozen=True)
class Decision:
    """What to do now: start ``start`` containers and retire those in ``retire``."""

    desired: int
    start: int = 0
    retire: tuple[str, ...] = ()
    reason: str = ""
    #: no decision was taken (nothing observed to decide on): keep what runs
    held: bool = False

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
    demand = obs.backlog + obs.in_flight
    demanded_containers = _containers_for(obs.spec, demand)
    buffered_containers = _apply_buffer(obs.spec, demand, demanded_containers)
    desired = _apply_bounds(obs, buffered_containers)
    capacity = live * obs.spec.target_inputs
    load = f"backlog {obs.backlog}, in flight {obs.in_flight}, capacity {capacity}"
    if desired > live:
        if obs.backing_off:
            return Decision(desired, reason=_joined(load, "backing off after a crash"))
        why = _why_start(obs, demand, buffered_containers, desired)
        return Decision(desired, start=desired - live, reason=_joined(load, why))
    if desired < live:
        chosen = _retirable(obs, desired)
        return Decision(
            desired, retire=chosen.idents, reason=_joined(load, _why_retire(obs, chosen))
        )
    return Decision(desired, reason=load)


def _joined(reason: str, why: str) -> str:
    return f"{reason}; {why}" if why else reason


def _why_start(obs: Observation, demand: int, wanted: int, desired: int) -> str:
    """What besides the demand set the number: a bound or the buffer (demand needs none)."""
    spec = obs.spec
    if desired > wanted:
        return f"min_containers {spec.min_containers}"
    if desired < wanted:
        return _bound_name(obs, desired)
    if spec.buffer_containers and demand > 0:
        return f"buffer_containers {spec.buffer_containers}"
    return ""


def _why_retire(obs: Observation, chosen: Retirement) -> str:
    upper = upper_bound(obs.spec, obs.node_capacity)
    notes = [f"above {_bound_name(obs, upper)}"] if chosen.over_bound and upper is not None else []
    if chosen.idle:
        notes.append(f"idle for scaledown_window {obs.spec.scaledown_window:g}s")
    return "; ".join(notes)


def _bound_name(obs: Observation, upper: int) -> str:
    if obs.spec.max_containers == upper:
        return f"max_containers {upper}"
    return f"node capacity {upper}"


def _containers_for(spec: FunctionSpec, demand: int) -> int:
    return math.ceil(demand / spec.target_inputs)


def _apply_buffer(spec: FunctionSpec, demand: int, desired: int) -> int:
    return desired + spec.buffer_containers if demand > 0 else desired


def upper_bound(spec: FunctionSpec, node_capacity: int | None) -> int | None:
    """The most containers the function may have: its own limit and the node's."""
    bounds = [b for b in (spec.max_containers, node_capacity) if b is not None]
    return min(bounds) if bounds else None


def _apply_bounds(obs: Observation, desired: int) -> int:
    desired = max(desired, obs.spec.min_containers)
    upper = upper_bound(obs.spec, obs.node_capacity)
    return desired if upper is None else min(desired, upper)


def _retirable(obs: Observation, desired: int) -> Retirement:
    live = len(obs.containers)
    upper = upper_bound(obs.spec, obs.node_capacity)
    over_bound = max(0, live - upper) if upper is not None else 0
    # A starting container cannot be retired yet; it drains on a later decision.
    least_busy = sorted(
        (c for c in obs.containers if not c.starting),
        key=lambda c: (c.in_flight, -c.idle_for, c.ident),
    )
    forced = least_busy[:over_bound]
    window = obs.spec.scaledown_window
    idle = sorted(
        (
            c
            for c in obs.containers
            if c not in forced and not c.starting and c.in_flight == 0 and c.idle_for >= window
        ),
        key=lambda c: (-c.idle_for, c.ident),
    )
    surplus = live - desired - len(forced)
    return Retirement(
        over_bound=tuple(c.ident for c in forced),
        idle=tuple(c.ident for c in idle[: max(0, surplus)]),
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
