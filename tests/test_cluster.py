"""Cluster mode: the bounds hold over every node, and a lost node's inputs come back.

Three real nodes (``celery worker -n nK@%h``) on one private Redis. Every count is read
from the processes or from what the inputs themselves recorded; every wait is on a
condition, with margins that hold on a loaded machine.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import redis

from celery_concurrent.leases import DEFAULT_TTL_S, ContainerLeases

from . import support
from .support import Workers, containers_of, free_port, wait_for

APP = "tests.apps.cluster"
NODES = 3


def live_containers(nodes: list[subprocess.Popen[bytes]]) -> dict[int, int]:
    """Each node's live containers (draining ones too), by node pid."""
    counts = {}
    for node in nodes:
        alive = [c for c in containers_of(node.pid) if c.status() != psutil.STATUS_ZOMBIE]
        counts[node.pid] = len(alive)
    return counts


class Cluster:
    def __init__(self, workers: Workers, rds: redis.Redis) -> None:
        self.workers = workers
        self.rds = rds
        self.nodes: list[subprocess.Popen[bytes]] = []

    def start(self, functions: str, count: int = NODES, env: dict[str, str] | None = None):
        for _ in range(count):
            n = len(self.nodes) + 1
            self.nodes.append(
                self.workers.start(
                    APP,
                    "-n",
                    f"n{n}@%h",
                    "-c",
                    "1",
                    "--without-mingle",
                    "--without-gossip",
                    "--concurrent-functions",
                    functions,
                    env=env,
                )
            )
        return self.nodes

    def containers(self) -> int:
        return sum(live_containers(self.nodes).values())

    def kill_node(self, node: subprocess.Popen[bytes]) -> None:
        """SIGKILL the node's whole process tree at once: a machine lost."""
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for proc in tree:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        node.wait(10)
        self.nodes.remove(node)

    def holder_of(self, function: str) -> subprocess.Popen[bytes]:
        """The node whose containers run ``function`` now (the first one found)."""
        for node in self.nodes:
            if live_containers([node])[node.pid]:
                return node
        raise AssertionError(f"no node runs a container of {function}")

    def completed(self) -> set[str]:
        return {m.decode() for m in self.rds.smembers("completed")}

    def runs(self, ids: list[str]) -> dict[str, int]:
        values = self.rds.mget([f"runs:{i}" for i in ids])
        return {i: int(v or 0) for i, v in zip(ids, values, strict=True)}


@pytest.fixture
def cluster(workers: Workers, rds: redis.Redis) -> Iterator[Cluster]:
    from .apps import cluster

    cluster.app.conf.broker_url = cluster.app.conf.result_backend = workers.broker_url
    yield Cluster(workers, rds)


def test_keep_warm_is_one_container_over_three_nodes_and_again_after_its_node_dies(cluster):
    cluster.start("tests.apps.cluster.warm")
    wait_for(lambda: cluster.containers() == 1, timeout=60, what="one warm container")
    leases = ContainerLeases(cluster.rds, "tests.apps.cluster.warm")
    # At rest it stays one: the other nodes see its lease and start none.
    settle = time.monotonic() + 3
    while time.monotonic() < settle:
        assert cluster.containers() == 1
        time.sleep(0.2)
    assert leases.count() == 1
    # Status shows the cluster's totals, and each node under them.
    from .apps import cluster as app_module

    row = support.row(app_module, "tests.apps.cluster.warm")
    assert (row["containers"], row["scope"], row["cluster_containers"]) == (1, "cluster", 1)
    assert len(row["nodes"]) == NODES and len(row["pids"]) == 1
    shown = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "concurrent", "status", "--nodes"],
        env=cluster.workers.env(),
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "1/1/3" in shown and "cluster" in shown, shown
    assert all(f"n{i}@" in shown for i in range(1, NODES + 1)), shown

    cluster.kill_node(cluster.holder_of("warm"))
    # Its lease lapses within a TTL; one of the two others starts the warm container.
    wait_for(
        lambda: cluster.containers() == 1 and leases.count() == 1,
        timeout=DEFAULT_TTL_S + 60,
        what="a warm container on another node",
    )
    settle = time.monotonic() + 3
    while time.monotonic() < settle:
        assert cluster.containers() <= 1
        time.sleep(0.2)
    assert cluster.containers() == 1


def test_a_burst_never_runs_more_than_the_limit_over_three_nodes_and_uses_all_of_it(cluster):
    from .apps import cluster as app_module

    cluster.start("tests.apps.cluster.limited")
    ids = [app_module.limited.delay(1.0).id for _ in range(36)]
    wait_for(
        lambda: cluster.completed() >= set(ids),
        timeout=180,
        what="every input of the burst to complete",
    )
    # Measured by the inputs: at no moment did more than 3 containers run inputs.
    assert int(cluster.rds.get("peak") or 0) == 3
    assert cluster.rds.scard("pids") >= 3
    assert set(cluster.runs(ids).values()) == {1}
    # The containers are spread over whichever nodes won the leases, 3 at most in all.
    assert cluster.containers() <= 3


def test_a_lost_nodes_inputs_complete_within_a_minute(cluster):
    from .apps import cluster as app_module

    cluster.start("tests.apps.cluster.limited")
    ids = [app_module.limited.delay(3.0).id for _ in range(24)]
    wait_for(
        lambda: int(cluster.rds.get("peak") or 0) >= 2,
        timeout=60,
        what="the burst to run on several containers",
    )
    victim = cluster.holder_of("limited")
    dead = [c.pid for c in containers_of(victim.pid)]
    cluster.kill_node(victim)
    # Its inputs died running: they no longer count as running (nothing replaces them
    # before their leases lapse, a TTL from now).
    assert int(cluster.rds.get("peak") or 0) <= 3
    cluster.rds.hdel("active", *dead)
    cluster.rds.set("peak", 0)
    # visibility_timeout is kombu's default (an hour): only the sweep can give them back
    # within this test's patience, and a surviving node says it did.
    wait_for(
        lambda: cluster.completed() >= set(ids),
        timeout=120,
        what="every input, those of the lost node too, to complete",
    )
    logs = "".join(cluster.workers.log_of(node) for node in cluster.nodes)
    assert "input(s) of a lost node back in the queue" in logs
    runs = cluster.runs(ids)
    assert min(runs.values()) >= 1
    assert int(cluster.rds.get("peak") or 0) <= 3  # the bound held after the loss too


def test_an_input_longer_than_visibility_timeout_runs_exactly_once(cluster):
    from .apps import cluster as app_module

    # kombu would hand it to another container after 3 s; its holder renews it instead.
    env = {"CC_VISIBILITY_TIMEOUT": "3"}
    cluster.start("tests.apps.cluster.limited", count=2, env=env)
    ids = [app_module.limited.delay(9.0).id for _ in range(2)]
    wait_for(lambda: cluster.completed() >= set(ids), timeout=120, what="both long inputs")
    # Give a wrong second delivery time to show itself before counting.
    time.sleep(2)
    assert cluster.runs(ids) == {i: 1 for i in ids}


def test_node_scope_keeps_the_bounds_per_node(cluster):
    cluster.start("tests.apps.cluster.warm", count=2, env=None)
    extra = cluster.workers.start(
        APP,
        "-n",
        "n9@%h",
        "-c",
        "1",
        "--without-mingle",
        "--without-gossip",
        "--concurrent-functions",
        "tests.apps.cluster.warm",
        "--concurrent-scope",
        "node",
    )
    cluster.nodes.append(extra)
    # The node-scoped node keeps its own warm container beside the cluster's one.
    wait_for(
        lambda: live_containers([extra])[extra.pid] == 1 and cluster.containers() == 2,
        timeout=60,
        what="one warm container in the cluster and one on the node-scoped node",
    )
    leases = ContainerLeases(cluster.rds, "tests.apps.cluster.warm")
    assert leases.count() == 1


def test_a_coordination_redis_that_restarts_empty_gets_its_leases_back_and_the_bound_holds(
    cluster, tmp_path
):
    from devkit.servers import RedisServer

    from .apps import cluster as app_module

    coordination = RedisServer().start()
    try:
        env = {"CC_COORDINATION_URL": coordination.url}
        cluster.start("tests.apps.cluster.limited", env=env)
        ids = [app_module.limited.delay(1.5).id for _ in range(60)]
        leases = ContainerLeases(coordination.client(), "tests.apps.cluster.limited")
        wait_for(lambda: leases.count() == 3, timeout=60, what="three leased containers")
        # It restarts without its data (no persistence): every lease is gone at once.
        assert coordination.proc is not None
        coordination.proc.kill()
        coordination.proc.wait(10)
        time.sleep(1)
        coordination.start()
        wait_for(
            lambda: any("taken again" in cluster.workers.log_of(n) for n in cluster.nodes),
            timeout=60,
            what="a node to take its containers' leases again",
        )
        wait_for(lambda: leases.count() == 3, timeout=60, what="the leases taken again")
        wait_for(lambda: cluster.completed() >= set(ids), timeout=180, what="every input")
        assert int(cluster.rds.get("peak") or 0) <= 3
        assert min(cluster.runs(ids).values()) == 1
    finally:
        coordination.stop()


class TcpProxy:
    """A TCP relay to a server that a test can cut: a node's whole network path to it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.open()

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        """Close every connection and refuse new ones: the path is gone."""
        with self._lock:
            server, self._server = self._server, None
            doomed, self._sockets = self._sockets, []
        for sock in [server, *doomed]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self._server is not server:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_a_node_cut_off_from_redis_stops_taking_inputs_and_its_share_goes_to_the_others(
    cluster, redis_server
):
    from .apps import cluster as app_module

    proxy = TcpProxy(redis_server.port)
    try:
        cut_off = {
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/0",
            "CC_STORE_URL": redis_server.url,
        }
        # The cut-off node starts first and takes every lease.
        (island,) = cluster.start("tests.apps.cluster.limited", count=1, env=cut_off)
        ids = [app_module.limited.delay(1.0).id for _ in range(90)]
        wait_for(lambda: live_containers([island])[island.pid] == 3, timeout=60, what="3 on it")
        cluster.start("tests.apps.cluster.limited", count=2)
        proxy.cut()
        cut_at = time.monotonic()
        leases = ContainerLeases(cluster.rds, "tests.apps.cluster.limited")

        def others_hold_the_limit() -> bool:
            members = leases.live()
            return len(members) == 3 and not any("-n1-" in m for m in members)

        # Its leases lapse within a TTL; the others take the limit and the rest of the work.
        wait_for(others_hold_the_limit, timeout=DEFAULT_TTL_S + 60, what="the others' leases")
        assert time.monotonic() - cut_at >= DEFAULT_TTL_S / 2  # not before its leases lapsed
        wait_for(lambda: cluster.completed() >= set(ids), timeout=180, what="every input")
        assert int(cluster.rds.get("peak") or 0) <= 3
        assert "cut off from the coordination Redis" in cluster.workers.log_of(island)

        # It comes back: it must not run over the limit the others hold.
        proxy.open()
        wait_for(
            lambda: "reachable again" in cluster.workers.log_of(island),
            timeout=60,
            what="the island to reach Redis again",
        )
        more = [app_module.limited.delay(1.0).id for _ in range(30)]
        wait_for(lambda: cluster.completed() >= set(more), timeout=180, what="the second burst")
        assert int(cluster.rds.get("peak") or 0) <= 3
    finally:
        proxy.cut()
