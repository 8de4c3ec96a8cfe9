"""The worker bootstep that runs the supervisor inside ``celery worker``.

The node keeps doing what it always did with plain tasks; this step adds, beside it,
a supervisor for the ``@concurrent`` functions the node serves.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps, signals
from celery.utils.log import get_logger

from ..coordination import configured_scope, lease_ttl
from ..errors import UnknownFunctionError
from ..registry import specs_of
from .app_ref import app_reference
from .gpus import detect_gpus, gpu_override
from .supervisor import Supervisor, SupervisorSettings, default_node_max_containers

logger = get_logger(__name__)

#: settings a node's command line can change that its containers must share
SHARED_SETTINGS = (
    "broker_url",
    "result_backend",
    "worker_send_task_events",
    "broker_transport_options",
)


class SupervisorStep(bootsteps.StartStopStep):
    """Runs a :class:`Supervisor` for the node's ``@concurrent`` functions."""

    label = "celery-concurrent supervisor"
    requires = ("celery.worker.components:Pool",)

    def __init__(
        self,
        worker: Any,
        without_concurrent: bool = False,
        concurrent_functions: str | None = None,
        concurrent_max_containers: int | None = None,
        concurrent_poll_interval: float | None = None,
        concurrent_function: str | None = None,
        concurrent_scope: str | None = None,
        gpus: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.enabled = not without_concurrent and not concurrent_function
        self.only = [n.strip() for n in (concurrent_functions or "").split(",") if n.strip()]
        self.max_containers = concurrent_max_containers
        self.poll_interval = concurrent_poll_interval
        self.gpus = gpus
        self.scope = concurrent_scope
        self.supervisor: Supervisor | None = None
        worker.concurrent_supervisor = None
        super().__init__(worker, **kwargs)

    def create(self, worker: Any) -> Any:
        specs = specs_of(worker.app)
        unknown = [name for name in self.only if name not in specs]
        if unknown:
            raise UnknownFunctionError(unknown[0], list(specs))
        served = [spec for name, spec in specs.items() if not self.only or name in self.only]
        # A malformed override stops the node even when it serves no GPU function.
        gpus = gpu_override(self.gpus)
        if not served:
            logger.info("celery-concurrent: no @concurrent functions to supervise")
            return self
        if gpus is None:
            gpus = detect_gpus() if any(s.gpu for s in served) else ()
        hints = sorted({type(worker.app.tasks[s.name]).__module__ for s in served})
        app_ref = app_reference(worker.app, hints)
        conf = worker.app.conf
        settings = SupervisorSettings(
            app_ref=app_ref,
            hostname=worker.hostname.partition("@")[2] or worker.hostname,
            node_max_containers=self.max_containers or default_node_max_containers(),
            loglevel=_level_name(worker.loglevel),
            logfile=worker.logfile,
            task_events=bool(worker.task_events),
            conf={key: conf[key] for key in SHARED_SETTINGS if conf.get(key) is not None},
            preload=[app_ref.partition(":")[0], *hints],
            nodename=worker.hostname,
            gpus=gpus,
            scope=configured_scope(worker.app, self.scope),
            lease_ttl=lease_ttl(worker.app),
        )
        if self.poll_interval:
            settings.poll_interval = self.poll_interval
        self.supervisor = Supervisor.create(worker.app, served, settings)
        worker.concurrent_supervisor = self.supervisor
        logger.info(
            "celery-concurrent: supervising %s (node bound: %s containers; GPUs: %s; scope: %s)",
            ", ".join(s.name for s in served),
            settings.node_max_containers,
            ", ".join(map(str, gpus)) or "none",
            self.supervisor.scope.name,
        )
        return self

    def start(self, worker: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.start()
            signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)

    def _on_shutting_down(self, sender: Any = None, how: str = "", **_: Any) -> None:
        # The node's own consumer takes a while to stop, and this step stops after it:
        # the containers must stop taking inputs the moment a warm shutdown begins.
        if how == "Warm" and self.supervisor is not None:
            self.supervisor.begin_drain()

    def stop(self, worker: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()

    def terminate(self, worker: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.terminate()

    def info(self, worker: Any) -> dict[str, Any]:
        if self.supervisor is None:
            return {}
        return {"concurrent": self.supervisor.stats()}


def _level_name(level: Any) -> str:
    import logging

    return level if isinstance(level, str) else logging.getLevelName(level)
