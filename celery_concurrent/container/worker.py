"""Turn a ``celery worker`` into a container of one ``@concurrent`` function.

A container is a real Celery worker process: acks, retries, events, revoke, Flower and
``inspect`` work unchanged. It consumes only its function's queue, runs up to
``max_inputs`` inputs at once, and holds no message beyond those, so the broker's queue
length is the true backlog.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery.utils.log import get_logger

from ..asyncbridge import offload_result_store
from ..brokers import is_redis
from ..constants import CONNECTIONS_BESIDE_SLOTS, REDIS_POLL_SECONDS
from ..contract import REPORT_ENV, container_nodename
from ..errors import ConfigurationError
from ..routing import declare_queue
from ..spec import ASYNC_POOL, FunctionSpec
from .batches import serve_batches
from .decoding import reuse_one_json_decoder
from .thread_pool import free_when_returned

logger = get_logger(__name__)

ASYNCIO_POOL_CLS = "celery_concurrent.container.aio_pool:AsyncioPool"
THREAD_POOL_CLS = "celery_concurrent.container.thread_pool:ThreadPool"


def pool_for(spec: FunctionSpec) -> str:
    """The Celery pool a container of ``spec`` runs its inputs on.

    The items of a ``@batched`` function wait for their batch on the event loop, sync or
    async: an item costs no thread, and a sync function's batches run on threads of
    their own (``batches.py``).
    """
    if spec.pool == ASYNC_POOL or spec.max_batch_size is not None:
        return ASYNCIO_POOL_CLS
    if spec.pool == "threads":
        return THREAD_POOL_CLS
    return spec.pool


def configure_container(worker: Any, spec: FunctionSpec, ident: str | int | None = None) -> None:
    """Reconfigure a worker that has not built its blueprint yet into a container.

    Called from ``worker_init``, after Celery has read the command line and before it
    creates the pool and the consumer.
    """
    if spec.pool == "gevent" and not _gevent_patched():
        raise ConfigurationError(
            "pool",
            spec.pool,
            f"the container of {spec.name} must start with '-P gevent' so that "
            "gevent can patch the standard library first",
        )
    host = worker.hostname.partition("@")[2] or socket.gethostname()
    worker.hostname = container_nodename(spec, ident if ident is not None else _pid(), host)
    # A batched container holds up to max_inputs batches of max_batch_size items each.
    worker.concurrency = spec.max_items
    worker.pool_cls = pool_for(spec)
    if worker.pool_cls == ASYNCIO_POOL_CLS:
        offload_result_store(worker.app.backend)
    if worker.pool_cls == THREAD_POOL_CLS:
        task = worker.app.tasks[spec.name]
        task.run = free_when_returned(task.run)
    worker.prefetch_multiplier = 1
    reuse_one_json_decoder()
    worker.options.update(autoscale=None, without_gossip=True)
    if os.environ.get(REPORT_ENV):
        # A supervised container gets its node's revokes at start (revokes.py) instead
        # of waiting a second for mingle's replies; a standalone one keeps mingle.
        worker.options["without_mingle"] = True
    # Redis: never reserve a message beyond the free slots (N running, none waiting).
    # Other brokers get the prefetch gate instead (prefetch_gate.py).
    if is_redis(worker.app):
        worker.app.conf.worker_disable_prefetch = True
        _shorten_redis_poll(worker.app)
        room_for_every_slot(worker.app, spec)
    # After a reconnect Celery lowers the prefetch and raises it again from the callback
    # of each ack, which a threads pool runs on the input's own thread: a synchronous
    # basic.qos there races the event loop for the AMQP socket and hangs the container.
    # The prefetch gate (early acks) and acks_late already bound what a container holds.
    worker.app.conf.worker_enable_prefetch_count_reduction = False
    declare_queue(worker.app, spec.queue)
    if spec.max_batch_size is not None:
        serve_batches(worker.app, spec)
    worker.app.amqp.queues.select([spec.queue])
    logger.info(
        "celery-concurrent: container %s serves %s from queue %s with %s %s",
        worker.hostname,
        spec.name,
        spec.queue,
        spec.max_inputs,
        "asyncio tasks" if spec.is_async else f"{spec.pool} slots",
    )


def _shorten_redis_poll(app: Any) -> None:
    """Let an idle container's ``BRPOP`` time out after REDIS_POLL_SECONDS, not kombu's 1 s.

    A warm shutdown waits for the pending ``BRPOP`` twice: Celery notices the SIGTERM's
    flag only when its event loop wakes up, and closing the channel reads the pending
    reply. With 1 s, a retired container exited 0.1 to 1.1 s after its SIGTERM
    (``benchmarks/bench_scaledown.py``). Redis takes a fractional timeout since 6.0; older
    servers, and a ``polling_interval`` the user set, keep theirs.
    """
    options = dict(app.conf.broker_transport_options or {})
    if "polling_interval" in options:
        return
    conn = app.connection_for_read()
    try:
        version = str(conn.default_channel.client.info("server").get("redis_version", "0"))
        major = int(version.split(".")[0])
    except Exception:  # noqa: BLE001 - unreachable now: the consumer's own retries decide
        return
    finally:
        conn.release()
    if major >= 6:
        options["polling_interval"] = REDIS_POLL_SECONDS
        app.conf.broker_transport_options = options


def room_for_every_slot(app: Any, spec: FunctionSpec) -> None:
    """Give the container's Redis connection pool a connection for each slot and some.

    Each slot acknowledges its input on its own thread (``acks_late``), all at the same
    instant after a burst, through the channel's pool; kombu's pool holds 10 unless told
    (``max_connections``) and raises when they are all in use, failing the ack. A larger
    number the user set is kept.
    """
    options = dict(app.conf.broker_transport_options or {})
    wanted = spec.max_inputs + CONNECTIONS_BESIDE_SLOTS
    if int(options.get("max_connections") or 10) < wanted:
        options["max_connections"] = wanted
        app.conf.broker_transport_options = options


def _pid() -> int:
    return os.getpid()


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))
