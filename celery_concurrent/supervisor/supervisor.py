"""The supervisor: one thread per node that scales every function's containers.

Each turn it takes in the containers' load reports, reaps exits, reads each queue's
backlog from the broker, asks the policy for a decision per function and has the
actuator carry it out. A turn takes one broker round trip, so it runs every
``poll_interval`` (50 ms by default): scale-up is immediate, not a poll of tens of
seconds. Load reports are taken in as they arrive in between.

Its collaborators come in through the constructor: the launcher, the backlog probe, the
redelivery, the report inbox and the revoke server. :meth:`Supervisor.create` makes the
real ones, which do I/O; tests give it fakes and drive :meth:`Supervisor.turn` by hand.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from ..constants import (
    CONTAINERS_PER_CPU,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SCOPE,
    MEMORY_PER_CONTAINER,
)
from ..coordination import URL_SETTING, coordination_store
from ..gpu import describe_requests
from ..leases import DEFAULT_TTL_S
from ..routing import declare_queue
from ..spec import FunctionSpec
from .actuator import Actuator, Launching
from .cluster import ClusterScope, NodeScope
from .devices import DeviceAllocator
from .gpus import GpuDevice
from .inbox import ReportInbox
from .launcher import ContainerLaunch, Launcher
from .node_status import node_rows, node_stats
from .policy import FunctionLoad, Observation, decide, device_capacity, node_share
from .pool import FunctionPool
from .probes import BacklogProbe
from .redelivery import Redelivery
from .revokes import RevokeServer

logger = get_logger(__name__)


def default_node_max_containers() -> int:
    """The node-wide bound on containers: a few per CPU, and one per so much memory."""
    cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 << 30
    return max(1, min(CONTAINERS_PER_CPU * cpus, memory // MEMORY_PER_CONTAINER))


@dataclass
class SupervisorSettings:
    app_ref: str
    hostname: str
    node_max_containers: int = field(default_factory=default_node_max_containers)
    poll_interval: float = DEFAULT_POLL_INTERVAL
    loglevel: str = "WARNING"
    logfile: str | None = None
    task_events: bool = False
    conf: dict[str, Any] = field(default_factory=dict)
    preload: list[str] = field(default_factory=list)
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    #: the node's full name (``gpu@host``): its name part keeps container names unique
    nodename: str = ""
    #: the node's GPUs, detected or from ``--gpus``
    gpus: tuple[GpuDevice, ...] = ()
    #: where the bounds hold: ``cluster`` (over every node) or ``node``
    scope: str = DEFAULT_SCOPE
    #: seconds a container's lease lives unless renewed (cluster scope)
    lease_ttl: float = DEFAULT_TTL_S

    def launch(
        self, spec: FunctionSpec, ident: str, env: dict[str, str], inbox: ReportInbox, revokes: str
    ) -> ContainerLaunch:
        """What one container of ``spec`` is started with: forked or exec'd, it reads this."""
        return ContainerLaunch(
            app_ref=self.app_ref,
            spec=spec,
            ident=ident,
            hostname=self.hostname,
            report_address=inbox.address,
            revokes_address=revokes,
            supervisor_pid=os.getpid(),
            loglevel=self.loglevel,
            logfile=self.logfile,
            task_events=self.task_events,
            conf=self.conf,
            env=env,
        )


class Supervisor:
    """Keeps, for every function it serves, a pool of containers that scales by itself.

    Parameters
    ----------
    specs:
        The functions this node serves.
    settings:
        The node's :class:`SupervisorSettings`.
    launcher, probe, redelivery:
        Start containers, read the backlogs, give a dead container's inputs back.
    inbox:
        Where the containers' reports arrive (:class:`ReportInbox`).
    revokes:
        Serves the node's revokes to starting containers (none in tests).
    scope:
        Where the bounds hold (:class:`NodeScope` unless given).
    """

    def __init__(
        self,
        specs: Iterable[FunctionSpec],
        settings: SupervisorSettings,
        *,
        launcher: Launcher,
        probe: BacklogProbe,
        redelivery: Redelivery,
        inbox: ReportInbox,
        revokes: RevokeServer | None = None,
        scope: NodeScope | ClusterScope | None = None,
    ) -> None:
        self.settings = settings
        self.scope = scope or NodeScope()
        self.pools: dict[str, FunctionPool] = {s.name: FunctionPool(s) for s in specs}
        self.devices = DeviceAllocator(settings.gpus)
        self.launcher = launcher
        self.probe = probe
        self.redelivery = redelivery
        self.inbox = inbox
        self.revokes = revokes
        revokes_address = revokes.address if revokes is not None else ""
        self.actuator = Actuator(
            self.pools,
            self.devices,
            Launching(
                launcher.start,
                lambda spec, ident, env: settings.launch(spec, ident, env, inbox, revokes_address),
            ),
            redelivery,
            settings.drain_timeout,
            ident_prefix(settings.nodename),
            self.scope,
        )
        _warn_unplaceable([p.spec for p in self.pools.values()], self.devices)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = time.monotonic()
        self.turn_seconds = 0.0
        self.turns = 0

    @classmethod
    def create(
        cls, app: Celery, specs: Iterable[FunctionSpec], settings: SupervisorSettings
    ) -> Supervisor:
        """A supervisor of ``app``'s functions with the real collaborators."""
        specs = list(specs)
        inbox = ReportInbox()
        redelivery = Redelivery(app)
        return cls(
            specs,
            settings,
            launcher=Launcher(settings.preload),
            probe=BacklogProbe(app),
            redelivery=redelivery,
            inbox=inbox,
            revokes=RevokeServer(inbox.path("revokes.sock")),
            scope=make_scope(app, specs, settings, redelivery),
        )

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.launcher.warm_up()
        if self.revokes is not None:
            self.revokes.start()
        self._thread = threading.Thread(target=self._run, name="celery-concurrent-supervisor")
        self._thread.daemon = True
        self._thread.start()

    def begin_drain(self) -> None:
        """Start no container and retire every one, now; :meth:`stop` waits for them.

        Safe in a signal handler: the supervisor's thread does it on its next turn. The
        node calls it as its warm shutdown begins, so that the containers stop taking
        inputs at once, not after the node's own consumer has shut down.
        """
        self._draining.set()
        self.wake()

    def stop(self, timeout: float | None = None) -> None:
        """Drain every container and wait for them to exit.

        A cold shutdown of the node meanwhile (a second Ctrl-C, a SIGQUIT) ends the
        wait: the containers are killed, and what they held goes back to the queue.
        """
        self._halt()
        deadline = time.monotonic() + (self.settings.drain_timeout if timeout is None else timeout)
        with self._lock:
            self.actuator.retire_all("node stopping", time.monotonic())
            draining = sum(len(p.retiring) for p in self.pools.values())
        if draining:
            logger.info("celery-concurrent: waiting for %d container(s) to drain", draining)
        while time.monotonic() < deadline and self.actuator.any_running():
            if cold_shutdown_requested():
                logger.warning("celery-concurrent: cold shutdown; killing the draining containers")
                break
            self._reap(time.monotonic())
            time.sleep(0.05)
        self.terminate()

    def terminate(self) -> None:
        """Kill whatever is still running, and give back what it held once it is gone."""
        self._halt()
        with self._lock:
            self.actuator.kill_all()
            deadline = time.monotonic() + 5
            while self.actuator.any_running() and time.monotonic() < deadline:
                self._reap(time.monotonic())
                time.sleep(0.02)
        self.probe.close()
        self.redelivery.close()
        self.scope.close()
        if self.revokes is not None:
            self.revokes.close()
        self.inbox.close()

    def _halt(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            self.wake()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(10)

    def wake(self) -> None:
        """Run a turn now (after a runtime update, for instance)."""
        self.inbox.wake()

    # -- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        next_turn = 0.0
        while not self._stopping.is_set():
            began = time.monotonic()
            if began >= next_turn:
                try:
                    with self._lock:
                        self.turn(began)
                except Exception:  # the loop must outlive any one bad turn
                    logger.exception("celery-concurrent: supervisor turn failed")
                self.turn_seconds += time.monotonic() - began
                self.turns += 1
                next_turn = began + self.settings.poll_interval
            try:
                woken, reports = self.inbox.wait(max(0.0, next_turn - time.monotonic()))
            except EOFError:
                return
            if woken:
                next_turn = 0.0  # a runtime update or a drain: act now
            elif reports:
                # Load reports arrive with every change of a busy container; keep the
                # latest and act on them at the next turn, not one turn per report.
                with self._lock:
                    self._read_reports()

    def turn(self, now: float) -> None:
        """One pass: take in reports, reap, read the backlogs, decide and act per function."""
        self._read_reports()
        self._reap(now)
        if self._draining.is_set():
            self.actuator.retire_all("node stopping", now)
            return
        self.actuator.retire_lost(self.scope.maintain(self.pools, now, self.devices.placeable), now)
        backlogs = self.probe.backlogs([pool.spec.queue for pool in self.pools.values()])
        for pool in self.pools.values():
            if backlogs[pool.spec.queue] is not None:
                pool.backlog = backlogs[pool.spec.queue] or 0
        for pool in self.pools.values():
            decision = decide(self.observe(pool, backlogs[pool.spec.queue], now))
            if decision.held:
                continue  # unreadable or unplaceable: keep what runs
            self.actuator.apply(pool, decision, now)
            pool.record_healthy(now)
        self.actuator.force_overdue_drains(now)

    def observe(self, pool: FunctionPool, backlog: int | None, now: float) -> Observation:
        """What the policy sees of ``pool`` now, the node's share and devices included."""
        loads = {
            name: FunctionLoad(p.live, p.backlog, self.devices.placeable(p.spec))
            for name, p in self.pools.items()
        }
        share = node_share(self.settings.node_max_containers, pool.spec.name, loads)
        free_slots = None if pool.spec.gpu is None else self.devices.capacity(pool.spec.gpu)
        elsewhere = self.scope.elsewhere(pool, backlog) if backlog is not None else ()
        return Observation(
            self.scope.bounds(pool.spec),
            None if elsewhere is None else backlog,  # Redis cannot say: keep what runs
            pool.states(now),
            node_capacity=device_capacity(share, pool.live, free_slots),
            placeable=self.devices.placeable(pool.spec),
            backing_off=pool.backing_off(now),
            elsewhere=elsewhere or (),
            peers=self.scope.peers(pool),
        )

    def _read_reports(self) -> None:
        self.actuator.receive(self.inbox.receive(), time.monotonic())

    def _reap(self, now: float) -> None:  # what the dead said last is read first
        self.actuator.reap(now, self._read_reports)

    # -- control -----------------------------------------------------------------

    def update(self, name: str, **bounds: Any) -> FunctionSpec:
        """Change a function's bounds at runtime; they apply at once."""
        with self._lock:
            pool = self.pools[name]
            pool.spec = pool.spec.with_bounds(**bounds)
        self.wake()
        logger.info("%s: bounds updated: %s", name, bounds)
        return self.pools[name].spec

    def status(self) -> list[dict[str, Any]]:
        """One row per function (a :class:`FunctionStatus` as a dict)."""
        with self._lock:
            return node_rows(self.pools.values(), self.settings.hostname, self.devices, self.scope)

    def stats(self) -> dict[str, Any]:
        """The ``concurrent`` section of the node's ``inspect stats`` reply."""
        uptime = max(time.monotonic() - self.started_at, 1e-9)
        return node_stats(
            self.settings.node_max_containers,
            self.settings.poll_interval,
            self.devices,
            cpu_share=self.turn_seconds / uptime,
            turns=self.turns,
            rows=self.status(),
        )


def make_scope(
    app: Celery, specs: list[FunctionSpec], settings: SupervisorSettings, redelivery: Redelivery
) -> NodeScope | ClusterScope:
    """The node's scope: cluster-wide bounds wherever a coordination Redis is at hand."""
    if settings.scope == "node":
        return NodeScope()
    store = coordination_store(app)
    if store is None:
        logger.warning(
            "celery-concurrent: no Redis to hold the bounds over the cluster (the broker "
            "is not Redis, nor is the result backend): max_containers and min_containers "
            "hold on each node alone. Set %s to a Redis URL to hold them cluster-wide.",
            URL_SETTING,
        )
        return NodeScope()
    routing_keys = {}
    for spec in specs:
        declare_queue(app, spec.queue)
        routing_keys[spec.name] = app.amqp.queues[spec.queue].routing_key or spec.queue
    logger.info("celery-concurrent: bounds hold over the cluster (leases in %s)", store.source)
    return ClusterScope(
        store.client(),
        store.prefix,
        settings.nodename or f"celery@{settings.hostname}",
        settings.hostname,
        sweep=redelivery.sweep,
        routing_keys=routing_keys,
        ttl=settings.lease_ttl,
    )


def _warn_unplaceable(specs: Iterable[FunctionSpec], devices: DeviceAllocator) -> None:
    for spec in specs:
        if spec.gpu is not None and not devices.placeable(spec):
            logger.warning(
                "%s: this node cannot place %s; its inputs wait in %s for a node that can",
                spec.name,
                describe_requests(spec.gpu),
                spec.queue,
            )


def cold_shutdown_requested() -> bool:
    """Whether the worker this runs in has begun a cold shutdown.

    Celery's signal handlers set this flag, which its own loops poll; the node's warm
    shutdown is then waiting in :meth:`Supervisor.stop`, on the main thread.
    """
    flag = worker_state.should_terminate
    return flag is not None and flag is not False


def ident_prefix(nodename: str) -> str:
    """What starts the idents of a node's containers, and so their node names.

    Two nodes on one host (``gpu@host``, ``cpu@host``) must never name two containers
    alike: ``gpu@host`` gives ``gpu-`` (``proj.embed-gpu-1@host``). The default node
    name ``celery`` gives none, so a lone node's containers keep short names.
    """
    name, at, _ = nodename.partition("@")
    return f"{name}-" if at and name and name != "celery" else ""
