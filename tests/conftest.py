"""Fixtures: a private Redis server per test session, and real worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .support import RedisServer, Workers


@pytest.fixture(autouse=True)
def _unshare_tasks_made_in_tests() -> Iterator[None]:
    """``@app.task`` shares each task with every app finalized later; undo that per test.

    Tests define tasks inside their bodies, often with the same names; without this,
    a later test's app would also register an earlier test's tasks.
    """
    from celery import _state

    finalizers = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(finalizers)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    # The test apps read the broker URL at import time.
    os.environ["CELERY_BROKER_URL"] = server.url
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def broker_url(redis_server: RedisServer) -> str:
    """The private Redis, emptied before each test so that no state leaks between tests."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def workers(broker_url: str, tmp_path: Path) -> Iterator[Workers]:
    """Start real ``celery worker`` processes; all are stopped when the test ends."""
    pool = Workers(broker_url, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def rds(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url)


@pytest.fixture
def basic_app(broker_url: str):
    """The container test app, pointed at the private Redis."""
    from .apps import basic

    basic.app.conf.broker_url = broker_url
    basic.app.conf.result_backend = broker_url
    return basic


@pytest.fixture
def scaling_app(broker_url: str):
    """The supervisor test app, pointed at the private Redis."""
    from .apps import scaling

    scaling.app.conf.broker_url = broker_url
    scaling.app.conf.result_backend = broker_url
    return scaling


@pytest.fixture
def gpu_app(broker_url: str):
    """The GPU test app, pointed at the private Redis."""
    from .apps import gpu

    gpu.app.conf.broker_url = broker_url
    gpu.app.conf.result_backend = broker_url
    return gpu


RABBITMQ_URL = os.environ.get("CC_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


class RabbitRun:
    """The RabbitMQ test app, with queues unique to one test, and its workers."""

    def __init__(self, app_module, workers: Workers, env: dict[str, str]) -> None:
        self.app = app_module
        self.workers = workers
        self.env = env
        self.queues = [f"cc-test-{env['CC_QUEUE_SUFFIX']}.{name}" for name in ("slow", "aslow")]

    def start(self, *args: str, **kwargs):
        return self.workers.start("tests.apps.rabbit", *args, env=self.env, **kwargs)

    def queue_length(self, name: str) -> int:
        from kombu import Connection

        with Connection(RABBITMQ_URL) as conn:
            return conn.default_channel.queue_declare(name, passive=True).message_count


@pytest.fixture
def rabbitmq(broker_url: str, tmp_path: Path):
    """The RabbitMQ test app on this machine's broker, with queues unique to this test.

    Without a reachable RabbitMQ the test is skipped, except under CI=true, where it fails.
    """
    import importlib
    import uuid

    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable broker
        message = f"no RabbitMQ reachable at {RABBITMQ_URL}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {
        "CC_RABBITMQ_URL": RABBITMQ_URL,
        "CC_RESULT_BACKEND": broker_url,
        "CC_QUEUE_SUFFIX": uuid.uuid4().hex[:10],
    }
    os.environ.update(env)
    from .apps import rabbit

    run = RabbitRun(importlib.reload(rabbit), Workers(RABBITMQ_URL, tmp_path), env)
    try:
        yield run
    finally:
        run.workers.stop_all()
        with Connection(RABBITMQ_URL) as conn:
            for name in run.queues:
                try:
                    conn.channel().queue_delete(name)
                except Exception:  # noqa: BLE001 - a queue this test never declared
                    pass
