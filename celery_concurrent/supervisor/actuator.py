"""Carry out the policy's decisions on this node: start, retire, reap and give back.

A retired container drains (SIGTERM is Celery's warm shutdown) and is killed only when
it overruns its drain deadline. A container that exits is reaped here: one that crashed
backs its function off, and the delivery tags it held unacknowledged (Redis) go back to
their queue at once, not after the transport's ``visibility_timeout``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from celery.utils.log import get_logger

from ..contract import RECYCLE_EXIT_CODE, LoadReport
from ..spec import FunctionSpec
from .cluster import ClusterScope, NodeScope
from .devices import DeviceAllocator
from .pool import Container, FunctionPool, describe_exit, lowest_free_ident

if TYPE_CHECKING:
    from .launcher import ContainerLaunch, ContainerProcess
    from .policy import Decision
    from .redelivery import Redelivery

logger = get_logger(__name__)


class Launching:
    """What the actuator needs to start a container: a launcher, and a launch to give it."""

    def __init__(
        self,
        start: Callable[[ContainerLaunch], ContainerProcess],
        launch: Callable[[FunctionSpec, str, dict[str, str]], ContainerLaunch],
    ) -> None:
        self.start = start
        self.launch = launch


class Actuator:
    """Starts, retires and reaps the containers of every function the node serves.

    Parameters
    ----------
    pools:
        The node's pools, by function name (the supervisor's own mapping).
    devices:
        The node's GPU allocator.
    launching:
        How to start a container (:class:`Launching`).
    redelivery:
        Gives a dead container's unacknowledged inputs back (``restore(tags)``).
    drain_timeout:
        Seconds a retired container may take to drain before it is killed.
    ident_prefix:
        What starts the idents of this node's containers (see ``ident_prefix``).
    scope:
        Where the bounds hold (``cluster.NodeScope`` or ``cluster.ClusterScope``): a
        start takes a lease first, an idle retirement releases one, an exit drops it.
    """

    def __init__(
        self,
        pools: dict[str, FunctionPool],
        devices: DeviceAllocator,
        launching: Launching,
        redelivery: Redelivery,
        drain_timeout: float,
        ident_prefix: str = "",
        scope: NodeScope | ClusterScope | None = None,
    ) -> None:
        self.scope = scope or NodeScope()
        self.pools = pools
        self.devices = devices
        self.launching = launching
        self.redelivery = redelivery
        self.drain_timeout = drain_timeout
        self.ident_prefix = ident_prefix
        self._by_ident: dict[str, tuple[FunctionPool, Container]] = {}
        #: (function, container ident, delivery tags) of dead containers, to give back
        self._to_restore: list[tuple[str, str, tuple[str, ...]]] = []

    # -- starting and retiring ---------------------------------------------------------

    def apply(self, pool: FunctionPool, decision: Decision, now: float) -> None:
        """Start and retire what ``decision`` says, and log the change of size."""
        before = pool.live
        for _ in range(decision.start):
            if not self.start(pool, now, decision.cluster_desired):
                break
        for ident in decision.retire:
            keep = decision.cluster_desired or 0
            if ident in decision.releases and not self.scope.release(pool, ident, keep):
                continue  # another node's container went first: this one stays warm
            self.retire(pool, ident, "scale-down", now)
        if pool.live != before:
            event = pool.record_event(before, pool.live, decision.reason)
            logger.info("%s: %s", pool.spec.name, event.describe())

    def start(self, pool: FunctionPool, now: float, limit: int | None = None) -> bool:
        """Start one container of ``pool``; ``False`` when it could not (devices, a
        crash, or no lease under ``limit``: other nodes started enough)."""
        # Reuse free idents: a bounded set of container names, not a new one per start.
        ident = lowest_free_ident(self._by_ident, self.ident_prefix)
        env: dict[str, str] = {}
        if pool.spec.gpu is not None:
            placement = self.devices.allocate(ident, pool.spec.gpu)
            if placement is None:
                return False
            env = placement.environ()
        elif self.devices.devices:
            # A CPU function on a GPU node must not touch devices GPU containers hold.
            env = {"CUDA_VISIBLE_DEVICES": ""}
        if not self.scope.admit(pool, ident, limit):
            self.devices.release(ident)
            return False
        try:
            process = self.launching.start(self.launching.launch(pool.spec, ident, env))
        except Exception as exc:  # noqa: BLE001 - reported, backed off, never fatal
            self.scope.drop(pool, ident)
            self.devices.release(ident)
            delay = pool.record_crash(
                Container(ident, _NoProcess(), now), f"cannot start a container: {exc}", now
            )
            logger.warning(
                "%s: cannot start a container (%s); retrying in %.0fs", pool.spec.name, exc, delay
            )
            return False
        container = Container(ident, process, started_at=now)
        pool.containers[ident] = container
        self._by_ident[ident] = (pool, container)
        return True

    def retire(self, pool: FunctionPool, ident: str, why: str, now: float) -> None:
        """Drain a running container: it finishes what runs and gives back what waits."""
        container = pool.containers.pop(ident, None)
        if container is None:
            return
        container.drain_deadline = now + self.drain_timeout
        pool.retiring[ident] = container
        container.process.terminate()
        logger.debug("%s: retiring container %s (%s)", pool.spec.name, ident, why)

    def retire_lost(self, lost: Iterable[tuple[FunctionPool, str, str]], now: float) -> None:
        """Drain the containers whose lease was lost (``ClusterScope.maintain``)."""
        for pool, ident, why in lost:
            logger.warning("%s: draining container %s: %s", pool.spec.name, ident, why)
            self.retire(pool, ident, why, now)

    def retire_all(self, why: str, now: float) -> None:
        for pool in self.pools.values():
            for ident in list(pool.containers):
                self.retire(pool, ident, why, now)

    def kill_all(self) -> None:
        """Kill every container; each is reaped as a retired one, not as a crash."""
        for pool in self.pools.values():
            pool.retiring.update(pool.containers)
            pool.containers.clear()
            for container in pool.retiring.values():
                container.process.kill()

    def force_overdue_drains(self, now: float) -> None:
        for pool in self.pools.values():
            for container in pool.retiring.values():
                if container.drain_deadline is not None and now > container.drain_deadline:
                    logger.warning(
                        "%s: container %s did not drain in %.0fs; killing it",
                        pool.spec.name,
                        container.ident,
                        self.drain_timeout,
                    )
                    container.process.kill()
                    container.drain_deadline = None

    # -- what the containers say and do -------------------------------------------------

    def receive(self, reports: Iterable[LoadReport], now: float) -> None:
        """Keep each container's latest report."""
        for report in reports:
            found = self._by_ident.get(report.ident)
            # Idents are reused: a late report of an exited container is not the new one's.
            if found is None or found[1].process.pid not in (None, report.pid):
                continue
            pool, container = found
            if report.ready and not container.ready:
                pool.record_ready(container, now)
            container.report = report

    def exited(self) -> list[tuple[FunctionPool, Container, int, bool]]:
        """The containers that have exited: (pool, container, exit code, was retired)."""
        found = []
        for pool in self.pools.values():
            for retired, containers in ((False, pool.containers), (True, pool.retiring)):
                for container in containers.values():
                    code = container.process.exitcode()
                    if code is not None:
                        found.append((pool, container, code, retired))
        return found

    def reap(self, now: float, read_reports: Callable[[], None]) -> None:
        """Forget the containers that exited; back off after a crash; give back what the
        dead held. ``read_reports`` first takes in what they said last."""
        exited = self.exited()
        if exited:
            read_reports()
        for pool, container, code, retired in exited:
            pool.forget(container.ident)
            self._by_ident.pop(container.ident, None)
            self.devices.release(container.ident)
            self.scope.drop(pool, container.ident)
            if not retired:
                self._unretired_exit(pool, container, code, now)
            if code not in (0, RECYCLE_EXIT_CODE):  # a warm shutdown gave back what it held
                self._give_back(pool, container)
        self.restore_held()

    def _unretired_exit(self, pool: FunctionPool, container: Container, code: int, now: float):
        if code == RECYCLE_EXIT_CODE:
            # It drained, as a warm shutdown does, to be rid of a thread it cannot stop.
            pool.recycles += 1
            logger.warning(
                "%s: container %s recycled: an input overran its time_limit; replacing it",
                pool.spec.name,
                container.ident,
            )
            reason = "recycled: an input overran its time_limit"
            pool.record_event(pool.live + 1, pool.live, reason, decided=False)
            return
        if code == 0:
            # Stopped from outside with a warm shutdown (a signal to the container, say):
            # it drained and gave back what it held. Not a crash.
            logger.warning(
                "%s: container %s stopped without being retired; replacing it",
                pool.spec.name,
                container.ident,
            )
            pool.record_event(pool.live + 1, pool.live, "stopped from outside", decided=False)
            return
        delay = pool.record_crash(container, describe_exit(code), now)
        logger.warning(
            "%s: container %s crashed (%s); %s",
            pool.spec.name,
            container.ident,
            pool.last_error,
            f"backing off {delay:.0f}s" if pool.consecutive_crashes > 1 else "replacing it",
        )
        pool.record_event(pool.live + 1, pool.live, f"crash: {pool.last_error}", decided=False)

    def _give_back(self, pool: FunctionPool, container: Container) -> None:
        if container.held:
            self._to_restore.append((pool.spec.name, container.ident, container.held))

    def restore_held(self) -> None:
        """Put dead containers' unacknowledged inputs back now, not after visibility_timeout."""
        while self._to_restore:
            name, ident, tags = self._to_restore[0]
            try:
                restored = self.redelivery.restore(tags)
            except Exception:  # noqa: BLE001 - never retried: the loop must go on
                logger.exception("%s: cannot give back the inputs of container %s", name, ident)
                restored = 0
            if restored is None:
                return  # the broker is unreachable: the next turn tries again
            self._to_restore.pop(0)
            if restored:
                logger.warning(
                    "%s: put %d unacknowledged input(s) of container %s back in the queue",
                    name,
                    restored,
                    ident,
                )

    def any_running(self) -> bool:
        return any(p.containers or p.retiring for p in self.pools.values())


class _NoProcess:
    """The process of a container that could not be started."""

    pid: int | None = None

    def exitcode(self) -> int | None:
        return 1

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass
