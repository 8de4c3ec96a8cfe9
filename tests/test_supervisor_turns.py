"""The supervisor turn by turn, with fakes: crash back-off, drain deadlines, stale reports,
redelivery and the node's fair share, on a clock the test sets.

Real nodes and containers are in ``test_supervisor.py``; here nothing is a process.
"""

from __future__ import annotations

import pytest

from celery_concurrent import FunctionSpec
from celery_concurrent.constants import BACKOFF_BASE_SECONDS

from .fakes import fake_node

FETCH = FunctionSpec.from_options("proj.fetch", {"max_inputs": 10, "scaledown_window": 5})
FLOOD = FunctionSpec.from_options("proj.flood", {"max_inputs": 1})


def ready_all(node, now: float, in_flight: int = 0) -> None:
    for pool in node.supervisor.pools.values():
        for container in pool.containers.values():
            node.report(container.process, container.ident, in_flight=in_flight, busy_at=now)


def test_a_crash_backs_the_function_off_before_it_starts_again():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 5
        node.supervisor.turn(0.0)
        (first,) = node.launcher.processes
        first.code = 1
        node.supervisor.turn(1.0)  # reaped as a crash: the next start waits
        assert len(node.launcher.processes) == 1
        row = node.supervisor.status()[0]
        assert row["crashes"] == 1 and row["error"] == "exit status 1"
        node.supervisor.turn(1.0 + BACKOFF_BASE_SECONDS + 0.01)
        assert len(node.launcher.processes) == 2


def test_a_crash_loop_doubles_its_back_off_and_is_shown():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 5
        now, back_offs = 0.0, []
        for _ in range(3):
            node.supervisor.turn(now)
            node.launcher.processes[-1].code = 1
            now += 0.1
            node.supervisor.turn(now)  # reaped
            back_offs.append(node.pool(FETCH.name).backoff_until - now)
            node.supervisor.turn(node.pool(FETCH.name).backoff_until - 0.01)
            now = node.pool(FETCH.name).backoff_until + 0.01
        assert back_offs == pytest.approx([1.0, 2.0, 4.0])
        assert len(node.launcher.processes) == 3  # none started while backing off
        row = node.supervisor.status()[0]
        assert row["crash_loop"] is True and row["crashes"] == 3


def test_a_container_that_cannot_be_started_counts_as_a_crash():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 5
        node.launcher.failure = OSError("no fork server")
        node.supervisor.turn(0.0)
        row = node.supervisor.status()[0]
        assert row["containers"] == 0
        assert row["error"] == "cannot start a container: no fork server"


def test_a_retired_container_that_overruns_its_drain_deadline_is_killed():
    with fake_node([FETCH], drain_timeout=30.0) as node:
        node.probe.backlog_of[FETCH.queue] = 1
        node.supervisor.turn(0.0)
        (process,) = node.launcher.processes
        node.report(process, "1", busy_at=0.0)
        node.probe.backlog_of[FETCH.queue] = 0
        node.supervisor.turn(10.0)  # idle 10 s > scaledown_window 5 s: retired
        assert process.terminated and not process.killed
        retired_at = node.pool(FETCH.name).retiring["1"].drain_deadline
        assert retired_at is not None
        node.supervisor.turn(retired_at - 1)
        assert not process.killed
        node.supervisor.turn(retired_at + 1)
        assert process.killed


def test_a_late_report_of_an_exited_container_does_not_count_for_its_successor():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 1
        node.supervisor.turn(0.0)
        (old,) = node.launcher.processes
        old.code = 0  # stopped from outside: replaced under the same ident
        node.supervisor.turn(0.1)
        new = node.launcher.processes[-1]
        assert new is not old and node.pool(FETCH.name).containers["1"].process is new
        node.report(old, "1", in_flight=9, busy_at=0.1)
        node.supervisor.turn(0.2)
        assert node.pool(FETCH.name).in_flight == 0
        node.report(new, "1", in_flight=3, busy_at=0.2)
        node.supervisor.turn(0.3)
        assert node.pool(FETCH.name).in_flight == 3


def test_a_crashed_container_gives_back_what_it_held_and_a_clean_exit_gives_nothing():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 20
        node.supervisor.turn(0.0)
        first, second = node.launcher.processes
        node.report(first, "1", in_flight=2, busy_at=0.0, held=("t1", "t2"))
        node.report(second, "2", in_flight=1, busy_at=0.0, held=("t3",))
        node.supervisor.turn(0.1)
        first.code = -9  # killed
        second.code = 0  # drained and acknowledged or gave back everything itself
        node.supervisor.turn(0.2)
        assert node.redelivery.restored == [("t1", "t2")]


def test_tags_of_a_dead_container_are_given_back_once_the_broker_is_reachable_again():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 1
        node.supervisor.turn(0.0)
        (process,) = node.launcher.processes
        node.report(process, "1", in_flight=1, busy_at=0.0, held=("t1",))
        node.supervisor.turn(0.1)
        node.redelivery.reachable = False
        process.code = 1
        node.supervisor.turn(0.2)
        assert node.redelivery.restored == []
        node.redelivery.reachable = True
        node.supervisor.turn(0.3)
        assert node.redelivery.restored == [("t1",)]
        node.supervisor.turn(0.4)
        assert node.redelivery.restored == [("t1",)]  # once


def test_an_unreachable_broker_keeps_what_runs_and_starts_nothing():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 30
        node.supervisor.turn(0.0)
        assert len(node.launcher.processes) == 3
        ready_all(node, 0.0)
        node.probe.backlog_of[FETCH.queue] = None
        node.supervisor.turn(100.0)  # idle past the window, but nothing is decided
        assert not any(p.terminated for p in node.launcher.processes)


def test_a_flood_of_one_function_leaves_the_other_its_fair_share_of_the_node():
    with fake_node([FETCH, FLOOD], node_max_containers=4) as node:
        node.probe.backlog_of[FLOOD.queue] = 100
        node.supervisor.turn(0.0)
        assert node.pool(FLOOD.name).live == 4  # alone, it may fill the node
        ready_all(node, 0.0, in_flight=1)
        node.probe.backlog_of[FETCH.queue] = 50
        node.supervisor.turn(0.1)
        # fetch gets its fair share (half) at once; flood drains down to its own half
        assert node.pool(FETCH.name).live == 2
        assert node.pool(FLOOD.name).live == 2 and len(node.pool(FLOOD.name).retiring) == 2


def test_a_drain_retires_every_container_and_starts_none():
    with fake_node([FETCH]) as node:
        node.probe.backlog_of[FETCH.queue] = 30
        node.supervisor.turn(0.0)
        node.supervisor.begin_drain()
        node.supervisor.turn(0.1)
        assert all(p.terminated for p in node.launcher.processes)
        assert node.pool(FETCH.name).live == 0
        node.supervisor.turn(0.2)
        assert len(node.launcher.processes) == 3
