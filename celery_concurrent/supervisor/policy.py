"""The scaling policy: a pure function from observations to a decision.

Read top to bottom it is the whole rule:

* ``demand = backlog + in_flight``;
* ``desired = ceil(demand / target_inputs)``, plus ``buffer_containers`` while busy;
* clamped to ``[min_containers, min(max_containers, node capacity)]``;
* start the difference at once when ``desired`` exceeds the live containers;
* retire only containers idle for ``scaledown_window``, most idle first, never below
  ``desired`` (which is never below ``min_containers``);
* above the upper bound (after a runtime update lowered it) drain the surplus at once,
  least busy first, leaving containers still starting for a later decision. Retiring
  always drains: no input is cut off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    backlog: int
    containers: tuple[ContainerState, ...] = ()
    #: the most containers of this function the node can hold now (node bound, devices)
    node_capacity: int | None = None

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

    @property
    def changes(self) -> bool:
        return bool(self.start or self.retire)


def decide(obs: Observation) -> Decision:
    """The scaling decision for one function."""
    demand = obs.backlog + obs.in_flight
    wanted = _apply_buffer(obs.spec, demand, _containers_for(obs.spec, demand))
    desired = _apply_bounds(obs, wanted)
    live = len(obs.containers)
    reason = (
        f"backlog {obs.backlog}, in flight {obs.in_flight}, "
        f"capacity {live * obs.spec.target_inputs}"
    )
    if desired > live:
        why = _why_start(obs, demand, wanted, desired)
        return Decision(desired, start=desired - live, reason=_joined(reason, why))
    if desired < live:
        retire = _retirable(obs, desired)
        return Decision(desired, retire=retire, reason=_joined(reason, _why_retire(obs, retire)))
    return Decision(desired, reason=reason)


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


def _why_retire(obs: Observation, retire: tuple[str, ...]) -> str:
    upper = upper_bound(obs.spec, obs.node_capacity)
    over = max(0, len(obs.containers) - upper) if upper is not None else 0
    forced = min(over, sum(1 for c in obs.containers if not c.starting))
    notes = [f"above {_bound_name(obs, upper)}"] if forced and upper is not None else []
    if len(retire) > forced:
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


def _retirable(obs: Observation, desired: int) -> tuple[str, ...]:
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
    return tuple(c.ident for c in (*forced, *idle[: max(0, surplus)]))
