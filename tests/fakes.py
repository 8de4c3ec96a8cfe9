"""Fakes around a :class:`Supervisor`, to drive it turn by turn without processes.

:func:`fake_node` builds a supervisor whose launcher, probe and redelivery are these
fakes (its report inbox is a real one: a socket in a temporary directory), so a test
can say what the broker holds, what each container reports and when it exits, and
call ``supervisor.turn(now)`` with any clock it likes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery_concurrent import FunctionSpec
from celery_concurrent.contract import LoadReport
from celery_concurrent.supervisor.gpus import GpuDevice
from celery_concurrent.supervisor.inbox import ReportInbox
from celery_concurrent.supervisor.launcher import ContainerLaunch
from celery_concurrent.supervisor.supervisor import Supervisor, SupervisorSettings


class FakeProcess:
    """A container process whose exit the test decides (``code``)."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.code: int | None = None
        self.terminated = False
        self.killed = False

    def exitcode(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.terminated = True  # draining: it exits when the test says so

    def kill(self) -> None:
        self.killed = True
        self.code = -9


class FakeLauncher:
    def __init__(self) -> None:
        self.launches: list[ContainerLaunch] = []
        self.processes: list[FakeProcess] = []
        #: set to an exception to make the next starts fail
        self.failure: Exception | None = None

    def warm_up(self) -> None:
        pass

    def start(self, launch: ContainerLaunch) -> FakeProcess:
        if self.failure is not None:
            raise self.failure
        self.launches.append(launch)
        self.processes.append(FakeProcess(1000 + len(self.processes)))
        return self.processes[-1]


class FakeProbe:
    """The broker's backlogs, as the test sets them; ``None`` means unreachable."""

    def __init__(self) -> None:
        self.backlog_of: dict[str, int | None] = {}

    def backlogs(self, queues: list[str]) -> dict[str, int | None]:
        return {queue: self.backlog_of.get(queue, 0) for queue in queues}

    def close(self) -> None:
        pass


@dataclass
class FakeRedelivery:
    """Records what would go back to the queue; ``reachable=False`` is a broker outage."""

    restored: list[tuple[str, ...]] = field(default_factory=list)
    reachable: bool = True

    def restore(self, tags: Sequence[str]) -> int | None:
        if not self.reachable:
            return None
        self.restored.append(tuple(tags))
        return len(tags)

    def close(self) -> None:
        pass


@dataclass
class FakeNode:
    supervisor: Supervisor
    launcher: FakeLauncher
    probe: FakeProbe
    redelivery: FakeRedelivery

    def report(self, process: FakeProcess, ident: str, **fields) -> None:
        """Send a load report through the supervisor's real inbox socket."""
        fields.setdefault("in_flight", 0)
        fields.setdefault("busy_at", 0.0)
        report = LoadReport(ident, process.pid or 0, **fields)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(report.encode(), self.supervisor.inbox.address)

    def pool(self, name: str):
        return self.supervisor.pools[name]


@contextmanager
def fake_node(
    specs: Sequence[FunctionSpec],
    gpus: tuple[GpuDevice, ...] = (),
    node_max_containers: int = 16,
    drain_timeout: float = 300.0,
    nodename: str = "celery@host",
    scope: Any = None,
) -> Iterator[FakeNode]:
    """A supervisor of ``specs`` with fakes around it, torn down at the end; ``scope`` is
    where its bounds hold (a real ``ClusterScope`` on a test's Redis, say)."""
    settings = SupervisorSettings(
        app_ref="proj:app",
        hostname="host",
        nodename=nodename,
        node_max_containers=node_max_containers,
        gpus=gpus,
        drain_timeout=drain_timeout,
    )
    node = FakeNode(None, FakeLauncher(), FakeProbe(), FakeRedelivery())  # type: ignore[arg-type]
    node.supervisor = Supervisor(
        specs,
        settings,
        launcher=node.launcher,
        probe=node.probe,
        redelivery=node.redelivery,
        inbox=ReportInbox(),
        scope=scope,
    )
    try:
        yield node
    finally:
        node.supervisor.terminate()
