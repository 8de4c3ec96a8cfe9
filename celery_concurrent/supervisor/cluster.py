"""Where a function's bounds hold: on this node alone, or over the cluster.

In cluster scope (the default wherever a Redis is at hand, see ``coordination``) every
container of a function holds a lease in the function's sorted set (``leases``): the
node takes it before it starts the container, renews it while the container runs and
drops it when the container has exited. So the set's live members are the function's
containers over every node, and:

- :meth:`ClusterScope.elsewhere` shows the policy the containers of the other nodes,
  with their load, so that demand and bounds are the function's over the cluster;
- :meth:`ClusterScope.admit` starts a container only while fewer than the decision's
  number hold leases: nodes that decide at the same instant never start more between
  them;
- :meth:`ClusterScope.release` lets an idle container go only while ``desired``
  (never below ``min_containers``) remain over the cluster;
- :meth:`ClusterScope.maintain` renews the node's leases every renew interval, and
  names the containers whose lease was lost: the node was cut off from Redis for a TTL,
  or Redis lost its data and the limit is now held by others. Those drain: a node that
  comes back from a partition must not run over the limit. It also sweeps the broker for
  inputs that no container renewed for a TTL (their node is gone: ``held_messages``) and
  gives them back.

:class:`NodeScope` is the same interface with nothing to coordinate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from ..contract import container_nodename
from ..leases import DEFAULT_TTL_S, ContainerLeases, ContainerLoad, spec_digest
from .policy import ContainerState

if TYPE_CHECKING:
    import redis

    from ..spec import FunctionSpec
    from .pool import Container, FunctionPool

logger = get_logger(__name__)

#: how often a function at rest on this node (no backlog, nothing in flight, no
#: container starting) reads the other nodes' containers; with work, every turn. A node
#: at rest decides nothing a second-old view gets wrong: a start is admitted by the
#: lease's own count, an idle retirement by its release. Reading every turn cost an idle
#: node a third of a percent of a core per function (``benchmarks/bench_cluster.py``).
IDLE_VIEW_SECONDS = 1.0

#: a retirement that :meth:`ClusterScope.maintain` asks for: (pool, container ident, why)
Lost = tuple["FunctionPool", str, str]


class NodeScope:
    """Node scope: each node holds the bounds alone; nothing to coordinate."""

    name = "node"

    def elsewhere(self, pool: FunctionPool, backlog: int = 0) -> tuple[ContainerState, ...] | None:
        return ()

    def bounds(self, spec: FunctionSpec) -> FunctionSpec:
        return spec

    def peers(self, pool: FunctionPool) -> int:
        return 1

    def admit(self, pool: FunctionPool, ident: str, limit: int | None) -> bool:
        return True

    def release(self, pool: FunctionPool, ident: str, keep: int) -> bool:
        return True

    def drop(self, pool: FunctionPool, ident: str) -> None:
        pass

    def maintain(
        self,
        pools: Mapping[str, FunctionPool],
        now: float,
        placeable: Callable[[FunctionSpec], bool] = lambda spec: True,
    ) -> list[Lost]:
        return []

    def describe(self, pool: FunctionPool) -> dict[str, Any]:
        return {"scope": self.name}

    def close(self) -> None:
        pass


class ClusterScope:
    """Cluster scope: this node's containers hold leases in the coordination Redis.

    Parameters
    ----------
    client:
        A plain Redis client on the coordination Redis, whose calls time out.
    prefix:
        The first part of the lease keys.
    nodename, hostname:
        This node's name (``celery@host``) and the host part its containers are named with.
    sweep:
        Gives back the inputs on the given routing keys that no one renewed for the
        given seconds (``Redelivery.sweep``); ``None`` when the broker needs no sweep.
    routing_keys:
        The routing key of each function's queue (by function name), to sweep.
    ttl:
        Seconds a lease lives unless renewed; renewed every third of it.
    """

    name = "cluster"

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        nodename: str,
        hostname: str,
        *,
        sweep: Callable[[Iterable[str], float], int | None] | None = None,
        routing_keys: Mapping[str, str] | None = None,
        ttl: float = DEFAULT_TTL_S,
    ) -> None:
        import redis

        self.client = client
        self.prefix = prefix
        self.nodename = nodename
        self.hostname = hostname
        self.sweep = sweep
        self.routing_keys = dict(routing_keys or {})
        self.ttl = ttl
        self.renew_interval = ttl / 3
        self._errors = (redis.RedisError, OSError)
        self._leases: dict[str, ContainerLeases] = {}
        #: the members this node holds a lease for (a released one holds none)
        self._held: set[str] = set()
        #: the others' load records, by function, as last read
        self._seen: dict[str, dict[str, ContainerLoad]] = {}
        #: by function: when the others' containers were last read, what they were, and
        #: how many nodes serve it and could place it (this one included)
        self._views: dict[str, tuple[float, tuple[ContainerState, ...], int]] = {}
        self._renewed_at = time.monotonic()
        self._next_renewal = 0.0
        self._unreachable_since: float | None = None
        #: no new container before this: after an outage the holders take theirs first
        self._starts_held_until = 0.0
        #: by function: inputs of lost nodes this node gave back, containers that lost
        #: their lease and drained
        self.swept: dict[str, int] = {}
        self.lost: dict[str, int] = {}

    # -- what the policy sees ----------------------------------------------------------

    def elsewhere(self, pool: FunctionPool, backlog: int = 0) -> tuple[ContainerState, ...] | None:
        """The function's containers on other nodes; ``None`` when Redis cannot say.
        Read every turn while the function has work here, else every
        :data:`IDLE_VIEW_SECONDS`."""
        name = pool.spec.name
        cached = self._views.get(name)
        if (
            not _busy(pool, backlog)
            and cached is not None
            and time.monotonic() - cached[0] < IDLE_VIEW_SECONDS
        ):
            return cached[1]
        try:
            loads, peers = self.leases(name).view()
        except self._errors as exc:
            self._failed(exc)
            return None
        self._reached()
        mine = {self.member(pool.spec, ident) for ident in (*pool.containers, *pool.retiring)}
        others = {member: load for member, load in loads.items() if member not in mine}
        self._seen[name] = others
        self._views[name] = (time.monotonic(), states(others), max(1, peers))
        return self._views[name][1]

    def bounds(self, spec: FunctionSpec) -> FunctionSpec:
        """``spec`` with the strictest ``max_containers`` any node holding a lease has."""
        return strictest(spec, self._seen.get(spec.name, {}).values())

    def peers(self, pool: FunctionPool) -> int:
        """The nodes that serve the function and could place it, as last read."""
        return self._views.get(pool.spec.name, (0.0, (), 1))[2]

    # -- a container's lease -----------------------------------------------------------

    def admit(self, pool: FunctionPool, ident: str, limit: int | None) -> bool:
        """Take the lease a new container needs before it starts; ``False``: do not start."""
        if time.monotonic() < self._starts_held_until:
            return False
        member = self.member(pool.spec, ident)
        try:
            admitted = self.leases(pool.spec.name).acquire(
                member, limit, self.ttl, container_load(self.nodename, pool, None, draining=False)
            )
        except self._errors as exc:
            self._failed(exc)
            return False
        if admitted:
            self._held.add(member)
        return admitted

    def release(self, pool: FunctionPool, ident: str, keep: int) -> bool:
        """Give up an idle container's lease only while ``keep`` remain over the cluster."""
        member = self.member(pool.spec, ident)
        try:
            released = self.leases(pool.spec.name).release(member, keep)
        except self._errors as exc:
            self._failed(exc)
            return False
        if released:
            self._held.discard(member)
        return released

    def drop(self, pool: FunctionPool, ident: str) -> None:
        """The container has exited: its lease goes (or lapses, if Redis is away)."""
        member = self.member(pool.spec, ident)
        self._held.discard(member)
        try:
            self.leases(pool.spec.name).drop(member)
        except self._errors as exc:
            self._failed(exc)

    # -- every renew interval ----------------------------------------------------------

    def maintain(
        self,
        pools: Mapping[str, FunctionPool],
        now: float,
        placeable: Callable[[FunctionSpec], bool] = lambda spec: True,
    ) -> list[Lost]:
        """Renew the node's leases when due, and say which functions the node can place;
        return the containers that lost their lease."""
        if now < self._next_renewal:
            return []
        self._next_renewal = now + self.renew_interval
        lost: list[Lost] = []
        try:
            for pool in pools.values():
                if placeable(pool.spec):
                    self.leases(pool.spec.name).announce(self.nodename, self.ttl)
                lost.extend(self._renew_pool(pool, now))
        except self._errors as exc:
            self._failed(exc)
            if time.monotonic() - self._renewed_at <= self.ttl:
                return lost
            # Its leases have lapsed by now: others may hold the limit.
            cut_off = _leased(pools, self._held, self.member)
            for pool, ident in cut_off:
                self._held.discard(self.member(pool.spec, ident))
                self.lost[pool.spec.name] = self.lost.get(pool.spec.name, 0) + 1
            return [(pool, ident, "cut off from the coordination Redis") for pool, ident in cut_off]
        self._renewed_at = time.monotonic()
        self._reached()
        self._sweep()
        for pool, _, _ in lost:
            self.lost[pool.spec.name] = self.lost.get(pool.spec.name, 0) + 1
        return lost

    def _renew_pool(self, pool: FunctionPool, now: float) -> list[Lost]:
        leases = self.leases(pool.spec.name)
        limit = self.bounds(pool.spec).max_containers
        lost = []
        for ident, container, draining in _containers(pool):
            member = self.member(pool.spec, ident)
            if member not in self._held:
                continue
            load = container_load(self.nodename, pool, container, draining)
            if leases.renew(member, self.ttl, load):
                continue
            # Lapsed (Redis restarted, or this node was away): take it again if the
            # limit still has room, else drain.
            if leases.acquire(member, limit, self.ttl, load):
                logger.warning("%s: lease of %s taken again", pool.spec.name, member)
                continue
            self._held.discard(member)
            if not draining:
                lost.append((pool, ident, "lease lost: the limit is held by other nodes"))
        return lost

    def _sweep(self) -> None:
        if self.sweep is None:
            return
        for function, routing_key in self.routing_keys.items():
            restored = self.sweep([routing_key], self.ttl)
            if restored:
                self.swept[function] = self.swept.get(function, 0) + restored
                logger.warning(
                    "%s: put %d input(s) of a lost node back in the queue", function, restored
                )

    # -- what status shows -------------------------------------------------------------

    def describe(self, pool: FunctionPool) -> dict[str, Any]:
        """The cluster's view of the function, for this node's status row."""
        name = pool.spec.name
        row = cluster_row(pool, self._seen.get(name, {}), self.lost.get(name, 0))
        return {
            **row,
            "coordination_reachable": self._unreachable_since is None,
            "swept": self.swept.get(name, 0),
        }

    def leases(self, function: str) -> ContainerLeases:
        if function not in self._leases:
            self._leases[function] = ContainerLeases(self.client, function, self.prefix)
        return self._leases[function]

    def member(self, spec: FunctionSpec, ident: str) -> str:
        return container_nodename(spec, ident, self.hostname)

    def close(self) -> None:
        for leases in self._leases.values():
            try:
                leases.withdraw(self.nodename)
            except self._errors:
                break  # Redis is away: the announcement lapses by itself
        self.client.close()

    def _failed(self, exc: BaseException) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            logger.warning("celery-concurrent: coordination Redis unreachable: %s", exc)

    def _reached(self) -> None:
        if self._unreachable_since is not None:
            self._unreachable_since = None
            # Redis may have restarted without its data: the running containers take
            # their leases again (now), before any node starts new ones in their place.
            self._next_renewal = 0.0
            self._starts_held_until = time.monotonic() + self.renew_interval
            logger.warning("celery-concurrent: coordination Redis reachable again")


def strictest(spec: FunctionSpec, loads: Iterable[ContainerLoad]) -> FunctionSpec:
    """``spec`` with the lowest ``max_containers`` of its own and the nodes' ``loads``."""
    limits = [load.max_containers for load in loads if load.max_containers is not None]
    if spec.max_containers is not None:
        limits.append(spec.max_containers)
    if not limits or min(limits) == spec.max_containers:
        return spec
    lowest = min(limits)
    return spec.with_bounds(max_containers=lowest, min_containers=min(spec.min_containers, lowest))


def container_load(
    nodename: str, pool: FunctionPool, container: Container | None, draining: bool
) -> ContainerLoad:
    """What a container of ``pool`` adds to the cluster's demand, for its lease record."""
    report = container.report if container is not None else None
    in_flight = report.in_flight if report is not None else 0
    idle_s = 0.0 if report is None or in_flight else max(0.0, time.monotonic() - report.busy_at)
    return ContainerLoad(
        node=nodename,
        in_flight=in_flight,
        idle_s=idle_s,
        ready=report is not None and report.ready,
        spec_digest=spec_digest(pool.spec),
        draining=draining,
        max_containers=pool.spec.max_containers,
    )


def _leased(
    pools: Mapping[str, FunctionPool], held: set[str], member: Callable[[FunctionSpec, str], str]
) -> list[tuple[FunctionPool, str]]:
    """The running containers that hold a lease."""
    return [
        (pool, ident)
        for pool in pools.values()
        for ident in pool.containers
        if member(pool.spec, ident) in held
    ]


def _busy(pool: FunctionPool, backlog: int) -> bool:
    """Work for the function here: a backlog, inputs in flight, a container starting."""
    return backlog > 0 or pool.in_flight > 0 or any(not c.ready for c in pool.containers.values())


def states(others: Mapping[str, ContainerLoad]) -> tuple[ContainerState, ...]:
    """What the policy sees of the other nodes' containers: the draining ones are no
    capacity (they still hold their leases, so the limit still counts them)."""
    return tuple(
        ContainerState(member, load.in_flight, load.idle_now, starting=not load.ready)
        for member, load in sorted(others.items())
        if not load.draining
    )


def cluster_row(
    pool: FunctionPool, others: Mapping[str, ContainerLoad], lost: int
) -> dict[str, Any]:
    """The cluster's part of the function's status row on this node."""
    mine = spec_digest(pool.spec)
    return {
        "scope": "cluster",
        "cluster_containers": len(others) + pool.live + len(pool.retiring),
        "spec_conflict": any(load.spec_digest != mine for load in others.values()),
        "leases_lost": lost,
    }


def _containers(pool: FunctionPool) -> list[tuple[str, Container, bool]]:
    return [
        *((ident, c, False) for ident, c in pool.containers.items()),
        *((ident, c, True) for ident, c in pool.retiring.items()),
    ]
