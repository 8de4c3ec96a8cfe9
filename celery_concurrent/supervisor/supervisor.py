"""The supervisor: one thread per node that scales every function's containers.

Each turn it reads the containers' load reports, reaps exits, reads each queue's
backlog from the broker, asks the policy for a decision per function and carries it
out. A turn takes one broker round trip, so it runs every ``poll_interval`` (50 ms by
default): scale-up is immediate, not a poll of tens of seconds. Load reports are read
as they arrive in between.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from ..contract import LoadReport, container_nodename
from ..gpu import describe_requests
from ..spec import FunctionSpec
from .devices import DeviceAllocator
from .gpus import GpuDevice
from .launcher import ContainerLaunch, Launcher
from .policy import Decision, Observation, decide
from .pool import Container, FunctionPool, lowest_free_ident
from .probes import BacklogProbe
from .redelivery import Redelivery
from .revokes import RevokeServer

logger = get_logger(__name__)

DEFAULT_POLL_INTERVAL = 0.05
#: a load report with the most delivery tags a container sends fits in this
MAX_REPORT_BYTES = 256 * 1024
#: a container that does not drain within this long after a node stop is killed
DEFAULT_DRAIN_TIMEOUT = 300.0


def default_node_max_containers() -> int:
    """The node-wide bound on containers: four per CPU, and one per 256 MiB of memory."""
    cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 << 30
    return max(1, min(4 * cpus, memory // (256 << 20)))


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


class Supervisor:
    """Keeps, for every function it serves, a pool of containers that scales by itself."""

    def __init__(self, app: Celery, specs: Iterable[FunctionSpec], settings: SupervisorSettings):
        self.app = app
        self.settings = settings
        self.pools: dict[str, FunctionPool] = {s.name: FunctionPool(s) for s in specs}
        self.devices = DeviceAllocator(settings.gpus)
        self._ident_prefix = ident_prefix(settings.nodename)
        for pool in self.pools.values():
            if pool.spec.gpu is not None and not self.placeable(pool.spec):
                logger.warning(
                    "%s: this node cannot place %s; its inputs wait in %s for a node that can",
                    pool.spec.name,
                    describe_requests(pool.spec.gpu),
                    pool.spec.queue,
                )
        self.launcher = Launcher(settings.preload)
        self.probe = BacklogProbe(app)
        self.redelivery = Redelivery(app)
        #: (function, container ident, delivery tags) of dead containers, to give back
        self._to_restore: list[tuple[str, str, tuple[str, ...]]] = []
        self._by_ident: dict[str, tuple[FunctionPool, Container]] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self._dir = tempfile.mkdtemp(prefix="celery-concurrent-")
        self.address = os.path.join(self._dir, "reports.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.setblocking(False)
        self.revokes = RevokeServer(os.path.join(self._dir, "revokes.sock"))
        self._report_buffer = bytearray(MAX_REPORT_BYTES)
        self._wake_r, self._wake_w = os.pipe()
        self.started_at = time.monotonic()
        self.turn_seconds = 0.0
        self.turns = 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.launcher.warm_up()
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

    def _retire_all(self, why: str) -> None:
        for pool in self.pools.values():
            for ident in list(pool.containers):
                self._retire(pool, ident, why)

    def stop(self, timeout: float | None = None) -> None:
        """Drain every container and wait for them to exit.

        A cold shutdown of the node meanwhile (a second Ctrl-C, a SIGQUIT) ends the
        wait: the containers are killed, and what they held goes back to the queue.
        """
        self._halt()
        deadline = time.monotonic() + (self.settings.drain_timeout if timeout is None else timeout)
        with self._lock:
            self._retire_all("node stopping")
            draining = sum(len(p.retiring) for p in self.pools.values())
        if draining:
            logger.info("celery-concurrent: waiting for %d container(s) to drain", draining)
        while time.monotonic() < deadline and self._any_running():
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
            for pool in self.pools.values():
                # Killed by the node, not crashed: reaped as retired containers are.
                pool.retiring.update(pool.containers)
                pool.containers.clear()
                for container in pool.retiring.values():
                    container.process.kill()
            deadline = time.monotonic() + 5
            while self._any_running() and time.monotonic() < deadline:
                self._reap(time.monotonic())
                time.sleep(0.02)
        self.probe.close()
        self.redelivery.close()
        self._sock.close()
        self.revokes.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _halt(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            self.wake()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(10)

    def _any_running(self) -> bool:
        return any(p.containers or p.retiring for p in self.pools.values())

    def wake(self) -> None:
        """Run a turn now (after a runtime update, for instance)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

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
                readable, _, _ = select.select(
                    [self._sock.fileno(), self._wake_r],
                    [],
                    [],
                    max(0.0, next_turn - time.monotonic()),
                )
            except (OSError, ValueError):
                return
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
                next_turn = 0.0  # a runtime update or a drain: act now
            elif readable:
                # Load reports arrive with every change of a busy container; keep the
                # latest and act on them at the next turn, not one turn per report.
                with self._lock:
                    self._read_reports()

    def turn(self, now: float) -> None:
        self._read_reports()
        self._reap(now)
        if self._draining.is_set():
            self._retire_all("node stopping")
            return
        backlogs = self.probe.backlogs([pool.spec.queue for pool in self.pools.values()])
        for pool in self.pools.values():
            backlog = backlogs[pool.spec.queue]
            if backlog is None:
                continue  # broker unreachable: keep what runs, decide nothing
            pool.backlog = backlog
            if not self.placeable(pool.spec):
                continue  # its inputs wait in the queue for a node with such GPUs
            decision = decide(
                Observation(
                    pool.spec, backlog, pool.states(now), node_capacity=self._capacity(pool)
                )
            )
            self._apply(pool, decision, now)
            pool.record_healthy(now)
        self._force_overdue_drains(now)

    def placeable(self, spec: FunctionSpec) -> bool:
        """Whether this node could ever run a container of ``spec`` (any CPU function can)."""
        return spec.gpu is None or self.devices.can_place(spec.gpu)

    def _capacity(self, pool: FunctionPool) -> int:
        capacity = self._node_capacity(pool)
        if pool.spec.gpu is None:
            return capacity
        # Running containers keep their devices; only the free ones bound new containers.
        return min(capacity, pool.live + self.devices.capacity(pool.spec.gpu))

    def _node_capacity(self, pool: FunctionPool) -> int:
        bound = self.settings.node_max_containers
        others = sum(p.live for p in self.pools.values() if p is not pool)
        # A function this node cannot place (a GPU it lacks) is never busy here.
        busy = sum(
            1
            for p in self.pools.values()
            if p is pool or p.live or (p.backlog and self.placeable(p.spec))
        )
        # Every busy function may use its fair share even when others fill the node;
        # the others then drain down to theirs, so a flood never starves a function.
        return max(max(1, bound // max(busy, 1)), bound - others)

    def _apply(self, pool: FunctionPool, decision: Decision, now: float) -> None:
        before = pool.live
        if decision.start:
            if pool.backing_off(now):
                return
            for _ in range(decision.start):
                if not self._start(pool, now):
                    break
        for ident in decision.retire:
            self._retire(pool, ident, "scale-down")
        if pool.live != before:
            event = pool.record_event(before, pool.live, decision.reason)
            logger.info("%s: %s", pool.spec.name, event.describe())

    def _start(self, pool: FunctionPool, now: float) -> bool:
        # Reuse free idents: a bounded set of container names, not a new one per start.
        ident = lowest_free_ident(self._by_ident, self._ident_prefix)
        env: dict[str, str] = {}
        if pool.spec.gpu is not None:
            placement = self.devices.allocate(ident, pool.spec.gpu)
            if placement is None:
                return False
            env = placement.environ()
        elif self.devices.devices:
            # A CPU function on a GPU node must not touch devices GPU containers hold.
            env = {"CUDA_VISIBLE_DEVICES": ""}
        launch = ContainerLaunch(
            app_ref=self.settings.app_ref,
            spec=pool.spec,
            ident=ident,
            hostname=self.settings.hostname,
            report_address=self.address,
            revokes_address=self.revokes.address,
            supervisor_pid=os.getpid(),
            loglevel=self.settings.loglevel,
            logfile=self.settings.logfile,
            task_events=self.settings.task_events,
            conf=self.settings.conf,
            env=env,
        )
        try:
            process = self.launcher.start(launch)
        except Exception as exc:  # noqa: BLE001 - reported, backed off, never fatal
            self.devices.release(ident)
            delay = pool.record_crash(Container(ident, _NoProcess(), now), None, now)
            pool.last_error = f"cannot start a container: {exc}"
            logger.warning(
                "%s: cannot start a container (%s); retrying in %.0fs", pool.spec.name, exc, delay
            )
            return False
        container = Container(ident, process, started_at=now)
        pool.containers[ident] = container
        self._by_ident[ident] = (pool, container)
        return True

    def _retire(self, pool: FunctionPool, ident: str, why: str) -> None:
        container = pool.containers.pop(ident, None)
        if container is None:
            return
        now = time.monotonic()
        container.retiring_since = now
        container.drain_deadline = now + self.settings.drain_timeout
        pool.retiring[ident] = container
        # SIGTERM is Celery's warm shutdown: stop consuming, finish what runs, and
        # give back what was reserved but not started.
        container.process.terminate()
        logger.debug("%s: retiring container %s (%s)", pool.spec.name, ident, why)

    def _force_overdue_drains(self, now: float) -> None:
        for pool in self.pools.values():
            for container in pool.retiring.values():
                if container.drain_deadline is not None and now > container.drain_deadline:
                    logger.warning(
                        "%s: container %s did not drain in %.0fs; killing it",
                        pool.spec.name,
                        container.ident,
                        self.settings.drain_timeout,
                    )
                    container.process.kill()
                    container.drain_deadline = None

    def _reap(self, now: float) -> None:
        for pool in self.pools.values():
            for ident, container in list(pool.containers.items()):
                code = container.process.exitcode()
                if code is None:
                    continue
                self._read_reports()  # what it said last, its held inputs included
                del pool.containers[ident]
                self._by_ident.pop(ident, None)
                self.devices.release(ident)
                if code == 0:
                    # Stopped from outside with a warm shutdown (a signal to the process
                    # group, say): it drained and gave back what it held. Not a crash.
                    logger.warning(
                        "%s: container %s stopped without being retired; replacing it",
                        pool.spec.name,
                        ident,
                    )
                    pool.record_event(
                        pool.live + 1, pool.live, "stopped from outside", decided=False
                    )
                    continue
                delay = pool.record_crash(container, code, now)
                logger.warning(
                    "%s: container %s crashed (%s); %s",
                    pool.spec.name,
                    ident,
                    pool.last_error,
                    f"backing off {delay:.0f}s" if pool.consecutive_crashes > 1 else "replacing it",
                )
                pool.record_event(
                    pool.live + 1, pool.live, f"crash: {pool.last_error}", decided=False
                )
                self._give_back(pool, ident, container)
            for ident, container in list(pool.retiring.items()):
                code = container.process.exitcode()
                if code is not None:
                    del pool.retiring[ident]
                    self._by_ident.pop(ident, None)
                    self.devices.release(ident)
                    if code != 0:  # a clean warm shutdown gave back what it held
                        self._give_back(pool, ident, container)
        self._restore_held()

    def _give_back(self, pool: FunctionPool, ident: str, container: Container) -> None:
        held = container.report.held if container.report is not None else ()
        if held:
            self._to_restore.append((pool.spec.name, ident, held))

    def _restore_held(self) -> None:
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

    def _read_reports(self) -> None:
        while True:
            try:
                size = self._sock.recv_into(self._report_buffer)
            except (BlockingIOError, OSError):
                return
            data = bytes(self._report_buffer[:size])
            try:
                report = LoadReport.decode(data)
            except (ValueError, TypeError):
                logger.warning("celery-concurrent: ignoring a malformed load report")
                continue
            found = self._by_ident.get(report.ident)
            # Idents are reused: a late report of an exited container is not the new one's.
            if found is None or found[1].process.pid not in (None, report.pid):
                continue
            pool, container = found
            if report.ready and not container.ready:
                pool.record_ready(container, time.monotonic())
            container.report = report

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
        """One row per function, with the names used everywhere."""
        with self._lock:
            return [self._row(pool) for pool in self.pools.values()]

    def _row(self, pool: FunctionPool) -> dict[str, Any]:
        spec = pool.spec
        event = pool.last_event
        return {
            "function": spec.name,
            "queue": spec.queue,
            "node": self.settings.hostname,
            "containers": pool.live,
            "ready": sum(1 for c in pool.containers.values() if c.ready),
            "retiring": len(pool.retiring),
            "min_containers": spec.min_containers,
            "max_containers": spec.max_containers,
            "max_inputs": spec.max_inputs,
            "target_inputs": spec.target_inputs,
            "buffer_containers": spec.buffer_containers,
            "scaledown_window": spec.scaledown_window,
            "in_flight": pool.in_flight,
            "backlog": pool.backlog,
            "capacity": pool.live * spec.target_inputs,
            "crashes": pool.crashes,
            "crash_loop": pool.crash_looping,
            "error": pool.last_error,
            "scale_ups": pool.scale_ups,
            "scale_downs": pool.scale_downs,
            "last_event": None if event is None else event.describe(),
            "last_event_at": None if event is None else event.wall,
            "pids": sorted(c.process.pid or 0 for c in pool.containers.values()),
            "gpu": None if spec.gpu is None else [str(r) for r in spec.gpu],
            "gpu_devices": self._gpu_devices(pool),
            "placeable": self.placeable(spec),
        }

    def _gpu_devices(self, pool: FunctionPool) -> dict[str, list[str]]:
        """The devices each container (running or draining) holds, by container node name."""
        held = {}
        for ident in [*pool.containers, *pool.retiring]:
            placement = self.devices.held(ident)
            if placement is not None:
                name = container_nodename(pool.spec, ident, self.settings.hostname)
                held[name] = [d.id for d in placement.devices]
        return held

    def stats(self) -> dict[str, Any]:
        uptime = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "node_max_containers": self.settings.node_max_containers,
            "gpus": [str(d) for d in self.devices.devices],
            "gpus_free": [d.id for d in self.devices.free],
            "poll_interval": self.settings.poll_interval,
            "supervisor_cpu_share": round(self.turn_seconds / uptime, 4),
            "turns": self.turns,
            "functions": self.status(),
        }


def cold_shutdown_requested() -> bool:
    """Whether the worker this runs in has begun a cold shutdown.

    Celery's signal handlers set this flag, which its own loops poll; the node's warm
    shutdown is then waiting in :meth:`Supervisor.stop`, on the main thread.
    """
    flag = worker_state.should_terminate
    return flag is not None and flag is not False


class _NoProcess:
    pid: int | None = None

    def exitcode(self) -> int | None:
        return 1

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


def ident_prefix(nodename: str) -> str:
    """What starts the idents of a node's containers, and so their node names.

    Two nodes on one host (``gpu@host``, ``cpu@host``) must never name two containers
    alike: ``gpu@host`` gives ``gpu-`` (``proj.embed-gpu-1@host``). The default node
    name ``celery`` gives none, so a lone node's containers keep short names.
    """
    name, at, _ = nodename.partition("@")
    return f"{name}-" if at and name and name != "celery" else ""
