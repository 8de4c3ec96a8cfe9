"""An opt-in Prometheus endpoint on the node: ``celery worker --concurrent-metrics-port``.

Every metric is named ``celery_concurrent_*`` and labelled ``function`` (the task name),
``node`` (the supervising node, ``celery@host``) and ``scope`` (``cluster`` when the
function's bounds hold over every node, ``node`` when they hold on each node alone). The
values are read from the supervisor when Prometheus scrapes, so the endpoint costs
nothing between scrapes and never disagrees with ``celery concurrent status``.

=========================================== ========= =====================================
metric                                      type      meaning
=========================================== ========= =====================================
``celery_concurrent_containers``            gauge     running containers (not draining)
``celery_concurrent_in_flight``             gauge     inputs the containers hold
``celery_concurrent_backlog``               gauge     inputs waiting in the function's queue
``celery_concurrent_capacity``              gauge     containers x ``target_inputs`` (x
                                                      ``max_batch_size`` if batched)
``celery_concurrent_min_containers``        gauge     ``min_containers`` (``keep_warm``)
``celery_concurrent_max_containers``        gauge     ``max_containers``, else the node bound
``celery_concurrent_scale_ups_total``       counter   decisions that added containers
``celery_concurrent_scale_downs_total``     counter   decisions that retired containers
``celery_concurrent_crashes_total``         counter   containers that exited unasked
``celery_concurrent_cluster_containers``    gauge     the function's containers over every
                                                      node, by their leases (cluster scope)
``celery_concurrent_leases_lost_total``     counter   containers drained: their lease was lost
``celery_concurrent_swept_total``           counter   inputs of lost nodes given back
``celery_concurrent_cold_start_seconds``    histogram start of a container to its first
                                                      ready report
``celery_concurrent_batch_size``            histogram items per call of a ``@batched``
                                                      function (its sum / count: the mean)
=========================================== ========= =====================================
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery import bootsteps
from celery.utils.log import get_logger
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..constants import BATCH_SIZE_BUCKETS, DEFAULT_METRICS_ADDRESS
from .supervisor import Supervisor

logger = get_logger(__name__)

PREFIX = "celery_concurrent_"
LABELS = ("function", "node", "scope")

#: gauge name -> (status row key, help)
GAUGES = {
    "containers": ("containers", "Running containers of the function (not draining)."),
    "in_flight": ("in_flight", "Inputs the function's containers hold (running or reserved)."),
    "backlog": ("backlog", "Inputs waiting in the function's queue."),
    "capacity": ("capacity", "Inputs the running containers aim to hold: containers x target."),
    "min_containers": ("min_containers", "Containers kept running with no traffic."),
    "max_containers": (
        "max_containers",
        "The most containers of the function: max_containers, else the node's bound.",
    ),
    "cluster_containers": (
        "cluster_containers",
        "The function's containers over every node, by their leases (cluster scope).",
    ),
}
#: counter name -> (status row key, help)
COUNTERS = {
    "scale_ups": ("scale_ups", "Scaling decisions that started containers."),
    "scale_downs": ("scale_downs", "Scaling decisions that retired containers."),
    "crashes": ("crashes", "Containers that exited without being asked to."),
    "recycles": ("recycles", "Containers replaced because an input overran its time_limit."),
    "leases_lost": ("leases_lost", "Containers drained because their lease was lost."),
    "swept": ("swept", "Inputs of lost nodes this node gave back to the queue."),
}


class SupervisorCollector(Collector):
    """Reads a supervisor's pools when scraped; registered on a private registry."""

    def __init__(self, supervisor: Supervisor | None, node: str) -> None:
        self.supervisor = supervisor
        self.node = node

    def collect(self) -> Iterator[Any]:
        supervisor = self.supervisor
        rows = supervisor.status() if supervisor is not None else []
        node_bound = supervisor.settings.node_max_containers if supervisor is not None else None
        gauges = {
            name: GaugeMetricFamily(PREFIX + name, text, labels=LABELS)
            for name, (_, text) in GAUGES.items()
        }
        counters = {
            name: CounterMetricFamily(PREFIX + name, text, labels=LABELS)
            for name, (_, text) in COUNTERS.items()
        }
        cold_starts = HistogramMetricFamily(
            PREFIX + "cold_start_seconds",
            "Seconds from a container's start to its first ready report.",
            labels=LABELS,
        )
        for row in rows:
            labels = [row["function"], self.node, row.get("scope") or "node"]
            for name, (key, _) in GAUGES.items():
                value = row.get(key)
                if key == "max_containers" and value is None:
                    value = node_bound
                if value is not None:
                    gauges[name].add_metric(labels, float(value))
            for name, (key, _) in COUNTERS.items():
                counters[name].add_metric(labels, float(row.get(key) or 0))
            pool = supervisor.pools.get(row["function"]) if supervisor is not None else None
            if pool is not None:
                buckets, total, _ = pool.cold_starts.snapshot()
                cold_starts.add_metric(
                    labels,
                    [(_bound_label(bound), count) for bound, count in buckets],
                    total,
                )
        yield from gauges.values()
        yield from counters.values()
        yield cold_starts
        yield batch_size_histogram(rows, self.node)


def batch_size_histogram(rows: list[dict[str, Any]], node: str) -> HistogramMetricFamily:
    """The batch sizes of each ``@batched`` function, from its status row."""
    family = HistogramMetricFamily(
        PREFIX + "batch_size",
        "Items per call of a @batched function.",
        labels=LABELS,
    )
    for row in rows:
        counts = row.get("batch_sizes") or []
        if not row.get("max_batch_size") or not counts:
            continue
        running, buckets = 0, []
        for bound, count in zip(BATCH_SIZE_BUCKETS, counts, strict=False):
            running += count
            buckets.append((_bound_label(bound), running))
        buckets.append(("+Inf", running))
        labels = [row["function"], node, row.get("scope") or "node"]
        family.add_metric(labels, buckets, float(row.get("batched_items") or 0))
    return family


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Scrapes every few seconds must not fill the node's log."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """A small HTTP server for one registry, on a thread of its own."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        self.registry = registry
        self.address = address
        self.requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one, or the one chosen for port 0)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._server = make_server(
            self.address,
            self.requested_port,
            make_wsgi_app(self.registry),
            server_class=_ThreadingServer6 if ":" in self.address else _ThreadingServer,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="celery-concurrent-metrics", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def metrics_registry(supervisor: Supervisor | None, node: str) -> CollectorRegistry:
    """A private registry holding the supervisor's metrics, and nothing else."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(supervisor, node))
    return registry


class MetricsStep(bootsteps.StartStopStep):
    """Serves the node's Prometheus metrics when ``--concurrent-metrics-port`` is given.

    Parameters
    ----------
    concurrent_metrics_port:
        The TCP port; ``None`` (the default) serves nothing, ``0`` picks a free port.
    concurrent_metrics_address:
        The address to bind, ``127.0.0.1`` unless told otherwise (``0.0.0.0`` for all).
    """

    label = "celery-concurrent metrics"
    requires = ("celery_concurrent.supervisor.bootstep:SupervisorStep",)

    def __init__(
        self,
        worker: Any,
        concurrent_metrics_port: int | None = None,
        concurrent_metrics_address: str | None = None,
        concurrent_function: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.port = concurrent_metrics_port
        self.address = concurrent_metrics_address or DEFAULT_METRICS_ADDRESS
        # A container has no supervisor; its node serves the metrics of all of them.
        self.enabled = concurrent_metrics_port is not None and not concurrent_function
        self.server: MetricsServer | None = None
        super().__init__(worker, **kwargs)

    def create(self, worker: Any) -> Any:
        return self

    def start(self, worker: Any) -> None:
        assert self.port is not None
        supervisor = getattr(worker, "concurrent_supervisor", None)
        registry = metrics_registry(supervisor, worker.hostname)
        try:
            self.server = MetricsServer(registry, self.address, self.port).start()
        except OSError as exc:
            # Monitoring must never stop the node from running its tasks.
            logger.error(
                "celery-concurrent: cannot serve metrics on %s:%s: %s", self.address, self.port, exc
            )
            return
        logger.info(
            "celery-concurrent: Prometheus metrics at http://%s:%s/metrics",
            self.address,
            self.server.port,
        )

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    terminate = stop
