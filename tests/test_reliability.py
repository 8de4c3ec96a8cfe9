"""Faults: nothing is lost when containers die, the broker restarts or the node stops.

Real nodes and containers, on Redis and on RabbitMQ (skipped without one, failing under
CI). Inputs are counted by task id as they finish, so an input that ran twice (it was
redelivered after its container died) counts once, and a lost one shows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from celery import group

from .apps.measure import UNTIL_RELEASED
from .conftest import RABBITMQ_URL, require_rabbitmq, skip_unless_ci
from .support import RedisServer, descendants, row, running, wait_for

APP = "tests.apps.faults"
STURDY = f"{APP}.sturdy"
#: seconds a crash-looping function waits before its fourth attempt
BACKOFF_AFTER_THREE_CRASHES = 4.0


def test_sigkilled_container_loses_no_acks_late_input(faults):
    node = faults.node("sturdy")
    sent = 20
    group(faults.app.sturdy.s("kill", UNTIL_RELEASED) for _ in range(sent)).apply_async()
    store = faults.app.recorder.store()
    # max_inputs=5, max_containers=2: both containers full, ten inputs still queued.
    wait_for(lambda: running(store, "kill") == 10, 60, what="10 running")
    victim = row(faults.app, STURDY)["pids"][0]
    os.kill(victim, signal.SIGKILL)
    faults.app.recorder.release("kill")
    # Its five inputs come back at once: on RabbitMQ by the broker itself, on Redis
    # from the supervisor (kombu alone would wait out the hour of visibility_timeout).
    wait_for(lambda: faults.completed("kill") == sent, 30, what=f"{sent} inputs completed")
    current = row(faults.app, STURDY)
    assert current["crashes"] == 1 and "killed by SIGKILL" in current["error"]
    assert victim not in current["pids"]
    if faults.kind == "redis":
        log = faults.workers.log_of(node)
        assert "put 5 unacknowledged input(s) of container" in log, log[-3000:]
        assert not faults.app.recorder.store().hlen("unacked")


def restart_rabbitmq(downtime: float) -> None:
    """``rabbitmqctl stop_app`` then ``start_app``: the broker drops every connection."""
    try:
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60)
        time.sleep(downtime)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)


@contextlib.contextmanager
def restartable_broker(kind: str) -> Iterator[tuple[str, Callable[[float], None]]]:
    """A broker this test may restart: a private Redis, or this machine's RabbitMQ."""
    if kind == "redis":
        server = RedisServer()
        try:
            server.start()
            yield server.url, server.restart
        finally:
            server.stop()
        return
    require_rabbitmq()
    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        skip_unless_ci("restarting RabbitMQ needs rabbitmqctl, run as root")
    try:
        yield RABBITMQ_URL, restart_rabbitmq
    finally:
        # Whatever happened, the broker is up again for the tests that follow.
        subprocess.run(["rabbitmqctl", "-q", "start_app"], timeout=120, check=False)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], timeout=120, check=False)


def broker_answers(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=1) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception:  # noqa: BLE001 - any failure: it does not answer
        return False
    return True


@contextlib.contextmanager
def once_unreachable(url: str, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` on a thread of its own as soon as the broker at ``url`` stops
    answering, or at the end of the block if it never did."""
    over = threading.Event()

    def watch() -> None:
        while not over.is_set() and broker_answers(url):
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=watch, name="outage-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        over.set()
        thread.join(30)


@pytest.mark.parametrize("kind", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def test_broker_restart_mid_burst_loses_no_acks_late_input(faults_on, kind):
    with restartable_broker(kind) as (url, restart):
        faults = faults_on(kind, broker=url)
        try:
            node = faults.node("sturdy")
            sent = 20
            group(faults.app.sturdy.s("restart", UNTIL_RELEASED) for _ in range(sent)).apply_async()
            store = faults.app.recorder.store()
            wait_for(lambda: running(store, "restart") == 10, 60, what="10 running")
            # The ten in flight end during the outage: their late acknowledgements meet a
            # broker that is not there.
            with once_unreachable(url, lambda: faults.app.recorder.release("restart")):
                restart(1.0)
            # Containers and supervisor reconnect by themselves; what ran during the
            # outage, or was held then, runs again or is acknowledged after it.
            wait_for(lambda: faults.completed("restart") == sent, 60, what=f"{sent} completed")
            assert node.poll() is None
            # The supervisor reads the backlog again: it scales on new work.
            more = group(faults.app.sturdy.s("after", 0.2) for _ in range(10)).apply_async()
            wait_for(lambda: faults.completed("after") == 10, 30, what="10 more completed")
            assert more.ready()
        finally:
            faults.workers.stop_all()


@pytest.mark.rabbitmq
def test_sigterm_of_the_node_mid_burst_drains_and_loses_nothing_on_rabbitmq(faults_on):
    faults = faults_on("rabbitmq")
    node = faults.node("sturdy")
    sent = 20
    group(faults.app.sturdy.s("term", UNTIL_RELEASED) for _ in range(sent)).apply_async()
    store = faults.app.recorder.store()
    wait_for(lambda: running(store, "term") == 10, 60, what="10 running")
    family = descendants(node.pid)
    node.send_signal(signal.SIGTERM)
    faults.workers.wait_for_log(node, "Warm shutdown", 30)
    # The inputs end only now, while the node shuts down: it waits for every one of them.
    faults.app.recorder.release("term")
    node.wait(60)
    # The ten in flight finished; the ten waiting are still the broker's, none held.
    assert faults.completed("term") == 10
    assert faults.queue_length("sturdy") == sent - 10
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_crash_looping_functions_back_off_show_why_and_others_keep_serving(faults):
    faults.node("broken_import", "segfaults", "echo")
    faults.app.broken_import.delay("never")
    faults.app.segfaults.delay("never")
    for name in ("broken_import", "segfaults"):
        wait_for(lambda n=name: row(faults.app, f"{APP}.{n}")["crashes"] >= 3, 60, what=name)
    broken = row(faults.app, f"{APP}.broken_import")
    segfaults = row(faults.app, f"{APP}.segfaults")
    assert broken["crash_loop"] and segfaults["crash_loop"]
    assert broken["error"] == (
        "exit status 1: ModuleNotFoundError: No module named 'tests.apps.no_such_driver'"
    )
    assert segfaults["error"] == "killed by SIGSEGV"
    # Three crashes each: the back-off (1 s, doubling) now holds their next attempts 4 s
    # away. A supervisor that waited it out would serve nothing meanwhile; each input of
    # the healthy function, its cold start included, comes back well within it.
    for i in range(3):
        started = time.monotonic()
        assert faults.app.echo.delay("served", i).get(timeout=30) == i
        assert time.monotonic() - started < BACKOFF_AFTER_THREE_CRASHES, i
    # Exponential back-off: a few more attempts, not a fork bomb.
    time.sleep(2)
    assert row(faults.app, f"{APP}.broken_import")["crashes"] - broken["crashes"] <= 2
    assert row(faults.app, f"{APP}.segfaults")["crashes"] - segfaults["crashes"] <= 2
    # The input that cannot run still waits in its queue for a fixed deployment.
    assert faults.queue_length("broken_import") == 1
