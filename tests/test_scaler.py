"""``celery concurrent scaler``: the demand endpoint KEDA reads, with real containers.

Each input of ``tests.apps.kube.gated`` is held until the test lets it go, so while the
test holds them the true demand is exactly the inputs sent: the endpoint must show it
(backlog + in flight over every container) within one report interval, with ``desired``
what the policy decides, and 0 / ``min_containers`` once the inputs are done.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from celery_concurrent.leases import RENEW_INTERVAL_S, ContainerLeases
from celery_concurrent.registry import specs_of
from celery_concurrent.supervisor.policy import ContainerState, Observation, decide

from .support import ModuleRun, free_port

APP = "tests.apps.kube"
GATED = "tests.apps.kube.gated"


@pytest.fixture
def kube(broker_url: str, monkeypatch: pytest.MonkeyPatch):
    from .apps import kube

    monkeypatch.delenv("CELERY_CONCURRENT_REPORT_SOCKET", raising=False)
    kube.app.conf.broker_url = broker_url
    kube.app.conf.result_backend = broker_url
    return kube


@pytest.fixture
def scaler(kube, broker_url: str):
    """The endpoint, run as its command: ``celery -A tests.apps.kube concurrent scaler``."""
    port = free_port()
    args = f"-A {APP} concurrent scaler --port {port}".split()
    run = ModuleRun(
        "celery",
        *args,
        env={"CELERY_BROKER_URL": broker_url},
    )
    try:
        line = run.wait_for_line("serving on", 60)
        assert f"http://127.0.0.1:{port}" in line  # loopback unless told otherwise
        yield f"http://127.0.0.1:{port}"
    finally:
        run.kill()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def demand(base: str) -> dict[str, Any]:
    status, body = get(f"{base}/functions/{GATED}")
    assert status == 200, body
    return body


def until(base: str, expected: dict[str, int], since: float, within: float) -> dict[str, Any]:
    """Poll until the endpoint shows ``expected``; fail if it takes over ``within`` s."""
    seen: dict[str, Any] = {}
    while time.monotonic() - since < within:
        seen = demand(base)
        if all(seen[key] == value for key, value in expected.items()):
            seen["after_s"] = time.monotonic() - since
            return seen
        time.sleep(0.02)
    raise AssertionError(f"not {expected} within {within:g}s: last {seen}")


def policy_desired(kube, body: dict[str, Any], holding: list[int]) -> int | None:
    spec = specs_of(kube.app)[GATED]
    elsewhere = tuple(ContainerState(f"c{i}", n) for i, n in enumerate(holding))
    obs = Observation(spec=spec, backlog=body["backlog"], elsewhere=elsewhere)
    return decide(obs).cluster_desired


def start_containers(workers, count: int) -> list:
    return [
        workers.start(APP, "--concurrent-function", GATED, "-n", f"kube{i}@%h")
        for i in range(count)
    ]


def burst_and_release(kube, base: str, containers: int, sent: int) -> None:
    """``sent`` inputs at once, held, then let go in two steps: the demand at each."""
    slots = containers * 4  # gated's max_inputs
    until(base, {"containers": containers, "in_flight": 0, "demand": 0}, time.monotonic(), 30)
    began = time.monotonic()
    results = [kube.gated.delay(i) for i in range(sent)]
    held = until(
        base,
        {"backlog": sent - slots, "in_flight": slots, "demand": sent},
        began,
        RENEW_INTERVAL_S + 5,
    )
    assert held["demand"] == held["backlog"] + held["in_flight"]
    assert held["desired"] == policy_desired(kube, held, [4] * containers)
    spec = specs_of(kube.app)[GATED]
    assert held["desired"] == min(spec.max_containers, math.ceil(sent / spec.target_inputs))
    print(f"{containers} container(s): demand {sent} shown {held['after_s']:.3f}s after the burst")

    kube.release(3)
    step = time.monotonic()
    partly = until(base, {"demand": sent - 3, "in_flight": slots}, step, RENEW_INTERVAL_S)
    print(f"  after 3 done: demand {sent - 3} shown {partly['after_s']:.3f}s later")

    kube.release(sent - 3)
    assert [r.get(timeout=60) for r in results] == list(range(sent))
    rest = until(
        base, {"demand": 0, "in_flight": 0, "backlog": 0}, time.monotonic(), RENEW_INTERVAL_S
    )
    assert rest["desired"] == spec.min_containers == 1
    assert rest["containers"] == containers


def test_demand_with_one_container_under_a_burst_and_at_rest(kube, scaler, workers):
    start_containers(workers, 1)
    burst_and_release(kube, scaler, containers=1, sent=10)


def test_demand_with_two_containers_under_a_burst_and_at_rest(kube, scaler, workers):
    start_containers(workers, 2)
    burst_and_release(kube, scaler, containers=2, sent=14)


def test_a_stopping_container_drops_its_lease_at_once(kube, scaler, workers, rds):
    first, _ = start_containers(workers, 2)
    until(scaler, {"containers": 2}, time.monotonic(), 30)
    workers.stop(first, drain=True)
    until(scaler, {"containers": 1}, time.monotonic(), 2)  # not after a lease TTL


def test_a_standalone_containers_lost_lease_is_taken_again(kube, scaler, workers, rds):
    """Redis restarted without its data: the container's next renewal is refused, and it
    takes its lease again (no bound: KEDA's maxReplicaCount is the bound on Kubernetes)."""
    start_containers(workers, 1)
    until(scaler, {"containers": 1}, time.monotonic(), 30)
    leases = ContainerLeases(rds, GATED, "celery-concurrent")
    rds.delete(leases.leases_key, leases.loads_key)
    assert demand(scaler)["containers"] == 0
    until(scaler, {"containers": 1}, time.monotonic(), RENEW_INTERVAL_S + 2)


def test_a_standalone_container_in_node_scope_takes_no_lease(kube, workers, rds):
    workers.start(APP, "--concurrent-function", GATED, env={"CC_SCOPE": "node"})
    time.sleep(RENEW_INTERVAL_S)
    assert ContainerLeases(rds, GATED, "celery-concurrent").count() == 0


def test_supervised_containers_hold_only_their_nodes_lease(kube, scaler, workers, rds):
    """A node's containers are counted once, by their node's lease (not their own too),
    and their inputs count in the demand like a standalone container's."""
    workers.start(APP, "--concurrent-functions", GATED, "-c", "1")
    leases = ContainerLeases(rds, GATED, "celery-concurrent")
    until(scaler, {"containers": 1}, time.monotonic(), 30)
    time.sleep(RENEW_INTERVAL_S)  # a container's own lease would show by now
    assert leases.count() == 1
    results = [kube.gated.delay(i) for i in range(3)]
    until(scaler, {"in_flight": 3, "demand": 3}, time.monotonic(), 2 * RENEW_INTERVAL_S + 5)
    kube.release(3)
    assert [r.get(timeout=60) for r in results] == [0, 1, 2]


def test_an_unknown_function_is_a_404_with_a_json_error(scaler):
    status, body = get(f"{scaler}/functions/tests.apps.kube.nope")
    assert status == 404
    assert "not a @concurrent function" in body["error"]
    assert get(f"{scaler}/healthz") == (200, {"ok": True})
