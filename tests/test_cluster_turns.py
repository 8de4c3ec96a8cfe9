"""Cluster scope turn by turn: two supervisors with fakes around them share one real Redis.

Nothing here is a process: the launcher, the probe and the redelivery are fakes, the
leases are real (the session's private Redis), and each turn runs on a clock the test
sets. The nodes with real processes are in ``test_cluster.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis

from celery_concurrent import FunctionSpec
from celery_concurrent.coordination import CoordinationStore
from celery_concurrent.leases import ContainerLeases
from celery_concurrent.supervisor.cluster import ClusterScope

from .fakes import FakeNode, fake_node
from .support import free_port

FETCH = FunctionSpec.from_options(
    "proj.fetch", {"max_inputs": 1, "max_containers": 3, "scaledown_window": 5}
)
WARM = FunctionSpec.from_options(
    "proj.warm", {"max_inputs": 10, "max_containers": 3, "min_containers": 1}
)


@contextlib.contextmanager
def two_nodes(rds: redis.Redis, spec: FunctionSpec, ttl: float = 10.0) -> Iterator[list[FakeNode]]:
    with contextlib.ExitStack() as stack:
        nodes = []
        for name in ("a", "b"):
            scope = ClusterScope(
                redis.Redis(connection_pool=rds.connection_pool),
                "celery-concurrent",
                f"{name}@host",
                "host",
                ttl=ttl,
            )
            nodes.append(
                stack.enter_context(fake_node([spec], nodename=f"{name}@host", scope=scope))
            )
        yield nodes


def ready(node: FakeNode, now: float, in_flight: int = 0) -> None:
    for pool in node.supervisor.pools.values():
        for container in pool.containers.values():
            node.report(container.process, container.ident, in_flight=in_flight, busy_at=now)


def test_two_nodes_that_see_a_burst_at_once_start_the_limit_between_them(rds):
    with two_nodes(rds, FETCH) as (a, b):
        a.probe.backlog_of[FETCH.queue] = b.probe.backlog_of[FETCH.queue] = 100
        a.supervisor.turn(0.0)
        b.supervisor.turn(0.0)
        assert len(a.launcher.processes) + len(b.launcher.processes) == 3
        assert ContainerLeases(rds, FETCH.name).count() == 3
        a.supervisor.turn(0.1)
        b.supervisor.turn(0.1)
        assert len(a.launcher.processes) + len(b.launcher.processes) == 3


def test_keep_warm_is_one_container_over_both_nodes(rds):
    with two_nodes(rds, WARM) as (a, b):
        for now in (0.0, 0.1, 0.2):
            a.supervisor.turn(now)
            b.supervisor.turn(now)
        assert (len(a.launcher.processes), len(b.launcher.processes)) == (1, 0)


def test_idle_containers_retire_over_the_cluster_never_below_keep_warm(rds):
    spec = FunctionSpec.from_options(
        "proj.warm",
        {"max_inputs": 1, "max_containers": 4, "min_containers": 1, "scaledown_window": 5},
    )
    with two_nodes(rds, spec) as (a, b):
        a.probe.backlog_of[spec.queue] = b.probe.backlog_of[spec.queue] = 2
        a.supervisor.turn(0.0)
        b.probe.backlog_of[spec.queue] = 4
        b.supervisor.turn(0.0)
        b.supervisor.turn(0.05)  # a share of the scale-up per turn
        started = len(a.launcher.processes) + len(b.launcher.processes)
        assert started == 4
        a.probe.backlog_of[spec.queue] = b.probe.backlog_of[spec.queue] = 0
        ready(a, 0.0)
        ready(b, 0.0)
        # Renewals write each node's loads; both decide on the same idle cluster.
        for node in (a, b):
            node.supervisor.turn(1.0)
        for node in (a, b):
            node.supervisor.turn(100.0)
        draining = [p for node in (a, b) for p in node.launcher.processes if p.terminated]
        assert len(draining) == 3
        assert ContainerLeases(rds, spec.name).count() == 1


def test_a_container_whose_lease_is_taken_by_others_drains(rds):
    with two_nodes(rds, FETCH) as (a, b):
        a.probe.backlog_of[FETCH.queue] = 1
        a.supervisor.turn(0.0)
        (first,) = a.launcher.processes
        # Redis lost its data, and the other node took the whole limit meanwhile.
        rds.flushall()
        b.probe.backlog_of[FETCH.queue] = 100
        b.supervisor.turn(0.0)
        assert len(b.launcher.processes) == 3
        a.supervisor.turn(10.0)  # its renewal is refused, and so is a new lease
        assert first.terminated
        assert a.supervisor.status()[0]["leases_lost"] == 1


def test_a_lapsed_lease_is_taken_again_while_the_limit_has_room(rds):
    with two_nodes(rds, FETCH) as (a, _):
        a.probe.backlog_of[FETCH.queue] = 1
        a.supervisor.turn(0.0)
        (first,) = a.launcher.processes
        rds.flushall()
        a.supervisor.turn(10.0)
        assert not first.terminated
        assert ContainerLeases(rds, FETCH.name).count() == 1


def test_a_node_that_cannot_reach_redis_starts_nothing_and_says_so(rds):
    dead = CoordinationStore(
        "concurrent_coordination_url", f"redis://127.0.0.1:{free_port()}/0"
    ).client()
    scope = ClusterScope(dead, "celery-concurrent", "a@host", "host", ttl=0.5)
    with fake_node([FETCH], nodename="a@host", scope=scope) as node:
        node.probe.backlog_of[FETCH.queue] = 5
        for now in (0.0, 5.0, 10.0):
            node.supervisor.turn(now)
        assert node.launcher.processes == []  # no lease, no start
        assert node.supervisor.status()[0]["coordination_reachable"] is False


def test_the_strictest_max_containers_of_any_node_holds(rds):
    relaxed = FETCH.with_bounds(max_containers=10)
    with contextlib.ExitStack() as stack:
        scopes = [
            ClusterScope(
                redis.Redis(connection_pool=rds.connection_pool),
                "celery-concurrent",
                f"{n}@host",
                "host",
            )
            for n in ("a", "b")
        ]
        a = stack.enter_context(fake_node([FETCH], nodename="a@host", scope=scopes[0]))
        b = stack.enter_context(fake_node([relaxed], nodename="b@host", scope=scopes[1]))
        a.probe.backlog_of[FETCH.queue] = b.probe.backlog_of[FETCH.queue] = 100
        a.supervisor.turn(0.0)
        b.supervisor.turn(0.0)
        b.supervisor.turn(0.1)
        assert len(a.launcher.processes) + len(b.launcher.processes) == 3
        assert b.supervisor.status()[0]["spec_conflict"] is True


def test_nodes_that_serve_a_function_share_its_scale_up(rds):
    with two_nodes(rds, FETCH) as (a, b):
        for node in (a, b):
            node.probe.backlog_of[FETCH.queue] = 0
            node.supervisor.turn(0.0)  # each says it serves the function
        a.probe.backlog_of[FETCH.queue] = b.probe.backlog_of[FETCH.queue] = 100
        a.supervisor.turn(0.1)
        assert len(a.launcher.processes) == 2  # ceil(3 / 2): its share, not all three
        b.supervisor.turn(0.1)
        assert len(b.launcher.processes) == 1
        a.supervisor.turn(0.2)
        assert len(a.launcher.processes) + len(b.launcher.processes) == 3


def test_a_node_that_cannot_place_a_function_does_not_count_as_its_peer(rds):
    from celery_concurrent.leases import ContainerLeases as Leases

    with two_nodes(rds, FETCH) as (a, b):
        b.supervisor.devices.placeable = lambda spec: False  # type: ignore[method-assign]
        for node in (a, b):
            node.supervisor.turn(0.0)
        _, peers = Leases(rds, FETCH.name).view()
        assert peers == 1


def test_at_rest_a_node_reads_the_others_once_a_second_and_every_turn_with_work(rds):
    with two_nodes(rds, FETCH) as (a, _):
        leases = a.supervisor.scope.leases(FETCH.name)
        real_view, reads = leases.view, []

        def counted():
            reads.append(1)
            return real_view()

        leases.view = counted  # type: ignore[method-assign]
        for i in range(20):
            a.supervisor.turn(i * 0.05)
        assert 1 <= len(reads) <= 2  # twenty turns well within a second, at rest
        reads.clear()
        a.probe.backlog_of[FETCH.queue] = 5
        for i in range(5):
            a.supervisor.turn(1.0 + i * 0.05)
        assert len(reads) == 5
