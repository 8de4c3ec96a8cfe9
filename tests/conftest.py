"""Fixtures: a private Redis server per test session, and real worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .support import RedisServer, Workers


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
