"""Fixtures: a private Redis server per test session, and real worker processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .support import RedisServer, Workers


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI job's timeout, ``timeout make test``) ends the run as Ctrl-C does, so
    # every fixture's teardown stops the workers and the Redis it started; they run in
    # sessions of their own, where no signal to this process reaches them.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every test that uses this machine's RabbitMQ in one test process, one at a
    time: one of them restarts the broker, which the others would see as a fault."""
    for item in items:
        if "rabbitmq" in item.nodeid or item.get_closest_marker("rabbitmq"):
            item.add_marker(pytest.mark.xdist_group("rabbitmq"))


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


@pytest.fixture
def app():
    """A fresh app on an in-memory broker; its tasks are unshared after the test (above)."""
    from celery import Celery

    return Celery("t", broker="memory://", set_as_current=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    # The test apps read the broker URL at import time.
    os.environ["CELERY_BROKER_URL"] = server.url
    try:
        server.start()
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
def batching_app(broker_url: str):
    """The batching test app, pointed at the private Redis."""
    from .apps import batching

    batching.app.conf.broker_url = broker_url
    batching.app.conf.result_backend = broker_url
    return batching


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


def skip_unless_ci(message: str) -> None:
    """Skip the test, except under CI=true, where what it needs must be there: fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_rabbitmq() -> None:
    """Skip (fail under CI=true) unless this machine's RabbitMQ answers."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable broker
        skip_unless_ci(f"no RabbitMQ reachable at {RABBITMQ_URL}: {exc}")


@pytest.fixture
def rabbitmq(broker_url: str, tmp_path: Path):
    """The RabbitMQ test app on this machine's broker, with queues unique to this test.

    Without a reachable RabbitMQ the test is skipped, except under CI=true, where it fails.
    """
    import importlib
    import uuid

    from kombu import Connection

    require_rabbitmq()
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


class FaultsRun:
    """The reliability test app (``tests.apps.faults``) on one broker, and its workers.

    Parameters
    ----------
    kind:
        ``"redis"`` or ``"rabbitmq"``.
    app:
        The app module, reloaded for this broker.
    broker:
        The broker URL its workers use; the counts stay in the session's Redis.
    """

    APP = "tests.apps.faults"

    def __init__(self, kind: str, app, broker: str, workers: Workers, env: dict[str, str]):
        self.kind = kind
        self.app = app
        self.broker = broker
        self.workers = workers
        self.env = env

    def start(self, *args: str, **kwargs):
        return self.workers.start(self.APP, *args, env=self.env, **kwargs)

    def node(self, *functions: str, extra=(), **kwargs):
        """A node (``celery worker``) supervising ``functions`` of the app.

        Its name is unique: on a RabbitMQ that other runs share, a second ``celery@host``
        could not declare its exclusive control queue.
        """
        names = ",".join(getattr(self.app, f).name for f in functions)
        args = ("-c", "1", "-n", self.nodename, "--concurrent-functions", names, *extra)
        return self.start(*args, **kwargs)

    @property
    def nodename(self) -> str:
        import socket

        return f"faults{self.env['CC_QUEUE_SUFFIX']}@{socket.gethostname()}"

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 30):
        """Run ``celery -A tests.apps.faults ARGS`` to completion (stdout, stderr, code)."""
        import subprocess
        import sys

        from .support import ROOT

        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", self.APP, *args],
            cwd=ROOT,
            env=self.workers.env({**self.env, **(env or {})}),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def queue(self, function: str) -> str:
        from celery_concurrent import spec_of

        spec = spec_of(getattr(self.app, function))
        assert spec is not None
        return spec.queue

    def queue_length(self, function: str) -> int:
        from kombu import Connection
        from kombu.exceptions import ChannelError

        with Connection(self.broker) as conn:
            channel = conn.channel()
            try:
                return int(channel.queue_declare(self.queue(function), passive=True)[1])
            except ChannelError:  # no such queue: nothing waits (as the supervisor reads it)
                return 0
            finally:
                try:
                    channel.close()
                except Exception:  # noqa: BLE001 - AMQP closed it on the 404 already
                    pass

    def completed(self, key: str) -> int:
        """How many distinct inputs with ``key`` finished (an input run twice counts once)."""
        return int(self.app.recorder.store().scard(f"completed:{key}"))

    def delete_queues(self) -> None:
        from kombu import Connection

        from celery_concurrent import specs_of

        with Connection(self.broker) as conn:
            for spec in specs_of(self.app.app).values():
                channel = conn.channel()
                try:
                    channel.queue_delete(spec.queue)
                except Exception:  # noqa: BLE001 - a queue this test never declared
                    pass
                finally:
                    try:
                        channel.close()
                    except Exception:  # noqa: BLE001 - closed by the broker already
                        pass


@pytest.fixture
def faults_on(broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make :class:`FaultsRun`\\ s: ``faults_on("redis")``, ``faults_on("rabbitmq")``, or
    ``faults_on("redis", broker=url)`` for a private Redis. Every worker is stopped and
    every RabbitMQ queue deleted at the end.
    """
    import importlib
    import uuid

    runs: list[FaultsRun] = []

    def make(kind: str, broker: str | None = None) -> FaultsRun:
        if kind == "rabbitmq":
            require_rabbitmq()
            broker = broker or RABBITMQ_URL
            suffix = uuid.uuid4().hex[:10]
        else:
            broker = broker or broker_url
            suffix = ""
        env = {
            "CC_FAULTS_BROKER": broker,
            "CC_QUEUE_SUFFIX": suffix,
            "CC_RESULT_BACKEND": broker_url,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        from .apps import faults

        run = FaultsRun(
            kind, importlib.reload(faults), broker, Workers(broker_url, tmp_path / kind), env
        )
        run.workers.logdir.mkdir(exist_ok=True)
        runs.append(run)
        return run

    try:
        yield make
    finally:
        for run in runs:
            run.workers.stop_all()
            if run.kind == "rabbitmq":
                run.delete_queues()


@pytest.fixture(params=["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def faults(request: pytest.FixtureRequest, faults_on) -> FaultsRun:
    """The reliability test app on each broker in turn."""
    return faults_on(request.param)
