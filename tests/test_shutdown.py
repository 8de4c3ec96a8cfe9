"""Stopping a node, by any signal a user or an orchestrator sends, never runs an
``acks_late`` input twice unless it was cut off, and never loses one.

One node serves a sync and an async function (``tests.apps.shutdown``), two containers
each, every slot busy and more inputs waiting in the queues when the signal comes. Each
input counts its runs in Redis by task id. After the node has exited, a second node
finishes what was left, and the counts say what happened:

- a warm shutdown (SIGTERM, or one Ctrl-C, to the node alone or to its whole process
  group) drains: what ran has finished and is acknowledged when the node exits, what
  waited is still in the queue, and every input runs exactly once;
- a cold shutdown (a second Ctrl-C, SIGQUIT) cuts the running inputs off: they run again
  later, once; nothing is lost;
- SIGTERM then SIGKILL of the group (systemd's or Kubernetes' stop after a grace period)
  leaves nothing running; what was cut off comes back after ``visibility_timeout``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import redis

from celery_concurrent import spec_of

from .support import Workers, descendants, wait_for

APP = "tests.apps.shutdown"
FUNCTIONS = ("sync_input", "async_input")
#: each function's slots: max_inputs 20 on each of max_containers 2
SLOTS = 40
#: inputs per function: every slot busy, and some waiting in the queue
SENT = 50
SECONDS = 2.0
#: inputs a cold shutdown cuts off: long enough that they are still running then
LONG_SECONDS = 3.0


class Node:
    """One test's inputs, the node that runs them, and every process it started."""

    def __init__(self, workers: Workers, app, rds: redis.Redis) -> None:
        self.workers = workers
        self.app = app
        self.rds = rds
        self.ids: dict[str, list[str]] = {}
        #: every process below a node this test started, to check (and clean up) at the end
        self.family: list[psutil.Process] = []
        #: the containers of the node being stopped (the fork server's children)
        self.containers: list[psutil.Process] = []

    def start(self) -> subprocess.Popen[bytes]:
        return self.workers.start(
            APP, "-c", "1", "--without-mingle", "--without-gossip", ready_timeout=60
        )

    def send(self, seconds: float = SECONDS) -> None:
        for name in FUNCTIONS:
            task = getattr(self.app, name)
            self.ids[name] = [task.delay(seconds).id for _ in range(SENT)]

    @property
    def all_ids(self) -> list[str]:
        return [i for ids in self.ids.values() for i in ids]

    def running(self, name: str) -> int:
        return int(self.rds.get(f"running:{getattr(self.app, name).name}") or 0)

    def wait_busy(self, node: subprocess.Popen[bytes], every_slot: bool = False) -> None:
        """Until each function runs a container's worth of inputs (or fills every slot);
        then note the node's processes.

        A test that kills containers waits for every slot: a container with a free slot
        may be receiving a message, and kombu loses one that a consumer killed between
        its two steps had taken off the queue and not yet recorded as unacknowledged.
        """
        least = SLOTS if every_slot else SLOTS // 2
        wait_for(
            lambda: all(self.running(name) >= least for name in FUNCTIONS),
            60,
            what=f"both functions running {least} inputs",
        )
        self.note_processes(node)

    def note_processes(self, node: subprocess.Popen[bytes]) -> None:
        children = {proc.pid for proc in psutil.Process(node.pid).children()}
        below = descendants(node.pid)
        self.family += below
        self.containers = [proc for proc in below if proc.pid not in children]

    def runs(self) -> dict[str, int]:
        counts = self.rds.mget([f"runs:{i}" for i in self.all_ids])
        return {i: int(n or 0) for i, n in zip(self.all_ids, counts, strict=True)}

    def completed(self) -> set[str]:
        return {member.decode() for member in self.rds.smembers("completed")}

    def waiting(self) -> int:
        """Inputs still in the functions' queues."""
        return sum(
            self.rds.llen(spec_of(getattr(self.app, name)).queue)  # type: ignore[union-attr]
            for name in FUNCTIONS
        )

    def unacknowledged(self) -> int:
        return int(self.rds.hlen("unacked"))

    def assert_containers_gone(self, timeout: float = 0.0) -> None:
        """The node's containers have exited (a zombie has: nothing may reap it yet)."""
        if timeout:
            wait_for(lambda: not alive(self.containers), timeout, what="the containers gone")
        assert self.containers and not alive(self.containers), alive(self.containers)

    def finish(self) -> dict[str, int]:
        """Start a node again, let it run every input left, stop it; the runs of each input."""
        node = self.start()
        try:
            try:
                wait_for(lambda: self.completed() >= set(self.all_ids), 90, interval=0.25)
            except AssertionError:
                raise AssertionError(f"not all inputs completed: {self.whereabouts()}") from None
            self.note_processes(node)
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            assert not alive(self.containers), alive(self.containers)
            # The fork servers and resource trackers exit once their node's containers have.
            wait_for(lambda: not alive(self.family), 20, what="every process of both nodes gone")
        finally:
            self.workers.stop_all()
        return self.runs()

    def whereabouts(self) -> dict[str, Any]:
        """Where the inputs that have not completed are: for a failing test's message."""
        missing = set(self.all_ids) - self.completed()
        unacked = {json.loads(p)[0]["headers"]["id"] for p in self.rds.hvals("unacked")}
        queued = set()
        for name in FUNCTIONS:
            queue = spec_of(getattr(self.app, name)).queue  # type: ignore[union-attr]
            queued |= {json.loads(p)["headers"]["id"] for p in self.rds.lrange(queue, 0, -1)}
        runs = self.runs()
        return {
            i: {
                "runs": runs[i],
                "unacked": i in unacked,
                "queued": i in queued,
                # FAILURE: it started, then raised before it counted its run
                "state": self.app.app.AsyncResult(i).state,
            }
            for i in missing
        }

    def kill_survivors(self) -> None:
        for proc in alive(self.family):
            proc.kill()


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.fixture
def shutdown(broker_url: str, workers: Workers, rds: redis.Redis) -> Iterator[Node]:
    from .apps import shutdown as app

    app.app.conf.broker_url = broker_url
    app.app.conf.result_backend = broker_url
    run = Node(workers, app, rds)
    try:
        yield run
    finally:
        workers.stop_all()
        run.kill_survivors()


def send_signal(node: subprocess.Popen[bytes], signum: int, target: str) -> None:
    if target == "group":  # what a terminal does: the node and every process it started
        os.killpg(node.pid, signum)
    else:
        node.send_signal(signum)


def assert_drained(run: Node) -> set[str]:
    """At the node's exit: what ran has finished and is acknowledged, nothing ran twice,
    and what never started waits in the queue. Returns the ids that ran."""
    runs = run.runs()
    ran = {i for i, n in runs.items() if n}
    assert max(runs.values()) == 1, {i: n for i, n in runs.items() if n > 1}
    assert run.completed() == ran, "inputs cut off by a warm shutdown"
    assert all(run.running(name) == 0 for name in FUNCTIONS)
    assert run.unacknowledged() == 0
    assert run.waiting() == len(run.all_ids) - len(ran), run.whereabouts()
    return ran


@pytest.mark.parametrize("target", ["node", "group"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_warm_shutdown_drains_and_runs_every_input_exactly_once(shutdown, signum, target):
    node = shutdown.start()
    shutdown.send()
    shutdown.wait_busy(node)
    send_signal(node, signum, target)
    node.wait(120)
    ran = assert_drained(shutdown)
    assert len(ran) >= SLOTS  # it did drain something: both functions were busy
    log = shutdown.workers.log_of(node)
    assert "crashed" not in log and "unacknowledged input(s)" not in log, log[-3000:]
    shutdown.assert_containers_gone()  # the node waited for them
    runs = shutdown.finish()
    assert set(runs.values()) == {1}, {i: n for i, n in runs.items() if n != 1}


def test_a_node_whose_fork_server_died_still_drains_its_containers(shutdown):
    """A dead fork server no longer tells the containers' exit (multiprocessing reads 255
    for each): the node must still wait for them, and give back nothing they run."""
    node = shutdown.start()
    shutdown.send()
    shutdown.wait_busy(node)
    (fork_server,) = [
        proc
        for proc in psutil.Process(node.pid).children()
        if "multiprocessing.forkserver" in " ".join(proc.cmdline())
    ]
    fork_server.kill()
    wait_for(lambda: not alive([fork_server]), 10, what="the fork server gone")
    node.send_signal(signal.SIGTERM)
    node.wait(120)
    assert_drained(shutdown)
    shutdown.assert_containers_gone()
    log = shutdown.workers.log_of(node)
    assert "crashed" not in log and "unacknowledged input(s)" not in log, log[-3000:]
    runs = shutdown.finish()
    assert set(runs.values()) == {1}, {i: n for i, n in runs.items() if n != 1}


#: fresh processes' first counts tried, with threads switching so often that a client
#: cache that is not thread-safe fails a count in nearly every trial
FIRST_COUNT_TRIALS = 20


def test_a_sync_containers_first_inputs_all_count_at_once(
    broker_url: str, rds: redis.Redis
) -> None:
    """A sync container's first inputs make their first count at once, each on its own
    thread, and none of them fails. (The counters' client was made twice there: the
    first one's garbage collection closed its pool under the inputs counting through
    it, and such an input failed at once: neither run, nor waiting, nor
    unacknowledged, it looked lost, and its freed slot took one more input.)"""
    from .apps import shutdown as app
    from .apps.measure import Recorder

    app.app.conf.broker_url = broker_url
    inputs = spec_of(app.sync_input).max_inputs  # type: ignore[union-attr]
    failures: list[BaseException] = []

    def first_count(store: Callable[[], redis.Redis], start: threading.Barrier) -> None:
        start.wait()
        try:
            store().pipeline().incr("first-counts").execute()
        except Exception as exc:  # noqa: BLE001 - what the test reports
            failures.append(exc)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(FIRST_COUNT_TRIALS):
            store = Recorder(app.app).store  # what a container that counted nothing has
            start = threading.Barrier(inputs)
            threads = [
                threading.Thread(target=first_count, args=(store, start)) for _ in range(inputs)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
    finally:
        sys.setswitchinterval(switch_interval)
    assert not failures, failures[:3]
    assert int(rds.get("first-counts") or 0) == FIRST_COUNT_TRIALS * inputs


def assert_ran_again_at_most_once(runs: dict[str, int], ran_before: set[str]) -> None:
    """Every input ran, none more than twice, and only one that had started (and was cut
    off before it was acknowledged) ran twice. (An input whose function had returned,
    but that was not acknowledged yet, counts as cut off.)"""
    twice = {i for i, n in runs.items() if n == 2}
    assert set(runs.values()) <= {1, 2}, {i: n for i, n in runs.items() if n > 2}
    assert twice <= ran_before, "an input that had not started ran twice"


def test_second_ctrl_c_is_a_cold_shutdown_that_loses_nothing(shutdown):
    node = shutdown.start()
    shutdown.send(LONG_SECONDS)
    shutdown.wait_busy(node, every_slot=True)
    os.killpg(node.pid, signal.SIGINT)
    # The second one comes while the node waits for its containers to drain.
    shutdown.workers.wait_for_log(node, "container(s) to drain", 30)
    os.killpg(node.pid, signal.SIGINT)
    node.wait(60)
    log = shutdown.workers.log_of(node)
    ran_before = {i for i, n in shutdown.runs().items() if n}
    assert ran_before - shutdown.completed(), "a cold shutdown cuts the running inputs off"
    assert "cold shutdown; killing the draining containers" in log, log[-3000:]
    # ... and the node gave them back at once, before it exited
    assert "unacknowledged input(s)" in log, log[-3000:]
    shutdown.assert_containers_gone()  # the node waited for them
    runs = shutdown.finish()
    assert_ran_again_at_most_once(runs, ran_before)


def test_sigquit_is_a_cold_shutdown_that_loses_nothing(shutdown):
    node = shutdown.start()
    shutdown.send(LONG_SECONDS)
    shutdown.wait_busy(node, every_slot=True)
    os.killpg(node.pid, signal.SIGQUIT)  # Ctrl-\: the node and every process it started
    node.wait(60)
    ran_before = {i for i, n in shutdown.runs().items() if n}
    assert ran_before - shutdown.completed(), "a cold shutdown cuts the running inputs off"
    log = shutdown.workers.log_of(node)
    assert "unacknowledged input(s)" in log, log[-3000:]
    shutdown.assert_containers_gone()  # the node waited for them
    runs = shutdown.finish()
    assert_ran_again_at_most_once(runs, ran_before)


def test_sigterm_then_sigkill_of_the_group_leaves_nothing_running_and_loses_nothing(shutdown):
    node = shutdown.start()
    shutdown.send(LONG_SECONDS)
    shutdown.wait_busy(node, every_slot=True)
    os.killpg(node.pid, signal.SIGTERM)
    time.sleep(1.0)  # the grace period, shorter than the inputs
    os.killpg(node.pid, signal.SIGKILL)
    node.wait(30)
    shutdown.assert_containers_gone(10)
    ran_before = {i for i, n in shutdown.runs().items() if n}
    cut_off = ran_before - shutdown.completed()
    assert cut_off, "the SIGKILL cuts the running inputs off"
    # No supervisor was left to give them back: they wait for visibility_timeout.
    assert shutdown.unacknowledged() >= len(cut_off)
    runs = shutdown.finish()
    assert_ran_again_at_most_once(runs, ran_before)
