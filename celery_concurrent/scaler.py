"""``celery -A proj concurrent scaler``: each function's true demand, for KEDA.

KEDA's own Redis and RabbitMQ triggers count only the messages that wait: inputs that a
worker prefetched or runs are invisible to them. This endpoint serves, per function,
``GET /functions/<task name>``::

    {"function": "proj.fetch", "queue": "concurrent.proj.fetch", "backlog": 12,
     "in_flight": 40, "demand": 52, "desired": 3, "containers": 2, ...}

- ``backlog``: the function queue's length, read from the broker (``BacklogProbe``);
- ``in_flight``: the inputs every container of the function holds, wherever it runs,
  from their leases' load records (a node writes its containers', a standalone
  container its own: ``container/heartbeat.py``);
- ``demand = backlog + in_flight``: what a ``metrics-api`` trigger reads, with the
  function's ``target_inputs`` as its per-replica target;
- ``desired``: what our own policy (``supervisor/policy.decide``) would run over the
  cluster, within the function's bounds.

Each request costs one pipelined ``LLEN`` and one Lua call. An unknown function is a 404,
and a broker or coordination Redis that cannot be read a 503 (KEDA's fallback then holds
the replicas), both with a JSON ``error``. ``GET /healthz`` asks nothing of either.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import click
from celery.bin.base import CeleryCommand
from celery.utils.log import get_logger

from .constants import DEFAULT_METRICS_ADDRESS
from .coordination import CoordinationStore, coordination_store
from .errors import UnknownFunctionError
from .leases import ContainerLeases, ContainerLoad
from .redact import mask_urls
from .registry import specs_of
from .spec import FunctionSpec
from .supervisor.cluster import strictest
from .supervisor.policy import ContainerState, Observation, decide
from .supervisor.probes import BacklogProbe

logger = get_logger(__name__)

#: the port the demand endpoint listens on unless ``--port`` says
DEFAULT_SCALER_PORT = 8080


class DemandUnavailable(Exception):
    """The broker or the coordination Redis cannot be read now."""


@dataclass(frozen=True)
class Demand:
    """One function's demand over the cluster, as the endpoint serves it."""

    function: str
    queue: str
    backlog: int
    in_flight: int
    #: ``backlog + in_flight``: what KEDA scales on
    demand: int
    #: the containers our policy would run over the cluster, within the bounds
    desired: int
    #: containers that hold a lease with a load record, wherever they run
    containers: int
    target_inputs: int
    min_containers: int
    max_containers: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def demand_of(spec: FunctionSpec, backlog: int, loads: Mapping[str, ContainerLoad]) -> Demand:
    """The demand of ``spec`` from its queue's ``backlog`` and its containers' ``loads``.

    ``desired`` is the policy's over the cluster: every container is "elsewhere" (the
    endpoint runs none), draining ones left out as a node leaves them out; their inputs
    still count in ``in_flight``.
    """
    bounded = strictest(spec, loads.values())
    states = tuple(
        ContainerState(member, load.in_flight, load.idle_now, starting=not load.ready)
        for member, load in sorted(loads.items())
        if not load.draining
    )
    decision = decide(Observation(spec=bounded, backlog=backlog, elsewhere=states))
    in_flight = sum(load.in_flight for load in loads.values())
    desired = decision.cluster_desired
    return Demand(
        function=spec.name,
        queue=spec.queue,
        backlog=backlog,
        in_flight=in_flight,
        demand=backlog + in_flight,
        desired=decision.desired if desired is None else desired,
        containers=len(loads),
        target_inputs=bounded.target_inputs,
        min_containers=bounded.min_containers,
        max_containers=bounded.max_containers,
    )


class DemandReader:
    """Reads each function's backlog and leases: one broker channel, one Redis client.

    Parameters
    ----------
    app:
        The Celery app whose ``@concurrent`` functions are served.
    store:
        Where the leases live (:func:`coordination_store`).
    """

    def __init__(self, app: Any, store: CoordinationStore) -> None:
        self.specs = specs_of(app)
        self.probe = BacklogProbe(app)
        self.client = store.client()
        self.leases = {
            name: ContainerLeases(self.client, name, store.prefix) for name in self.specs
        }
        self._lock = threading.Lock()  # the probe's channel is not shared between threads

    def read(self, name: str) -> Demand:
        """The demand of the function ``name``; raises :class:`UnknownFunctionError`, or
        :class:`DemandUnavailable` while the broker or Redis cannot be read."""
        spec = self.specs.get(name)
        if spec is None:
            raise UnknownFunctionError(name, list(self.specs))
        with self._lock:
            backlog = self.probe.backlogs([spec.queue])[spec.queue]
        if backlog is None:
            raise DemandUnavailable("the broker is unreachable")
        try:
            loads = self.leases[name].cluster_load()
        except Exception as exc:  # noqa: BLE001 - any Redis failure: KEDA falls back
            raise DemandUnavailable(
                f"the coordination Redis cannot be read: {mask_urls(str(exc))}"
            ) from exc
        return demand_of(spec, backlog, loads)

    def close(self) -> None:
        self.probe.close()
        self.client.close()


class _Handler(BaseHTTPRequestHandler):
    reader: DemandReader

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = unquote(urlsplit(self.path).path).rstrip("/")
        if path == "/healthz":
            self._reply(HTTPStatus.OK, {"ok": True})
        elif path == "/functions":
            self._reply(HTTPStatus.OK, {"functions": sorted(self.reader.specs)})
        elif path.startswith("/functions/"):
            self._function(path.removeprefix("/functions/"))
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path or '/'}"})

    def _function(self, name: str) -> None:
        try:
            demand = self.reader.read(name)
        except UnknownFunctionError as exc:
            self._reply(HTTPStatus.NOT_FOUND, {"error": str(exc), "function": name})
        except DemandUnavailable as exc:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc), "function": name})
        else:
            self._reply(HTTPStatus.OK, demand.as_dict())

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        logger.debug("scaler: " + format, *args)


def demand_server(reader: DemandReader, address: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server of ``reader``'s demand on ``address:port`` (not yet serving)."""
    handler = type("DemandHandler", (_Handler,), {"reader": reader})
    server = ThreadingHTTPServer((address, port), handler)
    server.daemon_threads = True
    return server


@click.command(cls=CeleryCommand)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_SCALER_PORT,
    show_default=True,
    help="The port to listen on (0 picks a free one).",
)
@click.option(
    "--address",
    default=DEFAULT_METRICS_ADDRESS,
    show_default=True,
    help="The address to bind (0.0.0.0 in a pod, so that KEDA reaches it).",
)
@click.pass_context
def scaler(ctx: click.Context, port: int, address: str) -> None:
    """Serve each @concurrent function's demand (backlog + in flight over every container)
    for KEDA's metrics-api trigger: GET /functions/<task name>."""
    app = ctx.obj.app
    store = coordination_store(app)
    if store is None:
        raise click.UsageError(
            "the demand endpoint reads the containers' leases: the app needs a Redis "
            "(a Redis broker or result backend, or concurrent_coordination_url)"
        )
    reader = DemandReader(app, store)
    try:
        server = demand_server(reader, address, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {address}:{port}: {exc}") from exc
    host, bound = str(server.server_address[0]), server.server_address[1]
    click.echo(f"celery-concurrent scaler: serving on http://{host}:{bound}", err=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        reader.close()
