"""Time limits and termination of container inputs: what prefork gives, on threads too.

Every test runs real containers (``celery worker --concurrent-function``) or a node
against the private Redis. Limits come as ``apply_async`` options, task options
(``guarded``) and app settings (``CC_LIMITS_SOFT``).
"""

from __future__ import annotations

import threading

import pytest
from celery import chord
from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded

from .support import row, wait_for

APP = "tests.apps.limits"
LIMITED = f"{APP}.limited"
ASYNC_LIMITED = f"{APP}.async_limited"
GUARDED = f"{APP}.guarded"
#: how long an input that a limit does not stop would run: far beyond any wait here
LONG = 60


@pytest.fixture
def limits(broker_url: str):
    from .apps import limits

    limits.app.conf.broker_url = broker_url
    limits.app.conf.result_backend = broker_url
    return limits


def container(workers, name: str, env: dict[str, str] | None = None):
    return workers.start(APP, "--concurrent-function", name, env=env)


def runs(rds, result) -> int:
    return int(rds.get(f"runs:{result.id}") or 0)


def failures(rds, result) -> int:
    return int(rds.get(f"failures:{result.id}") or 0)


def limits_failed_only_their_inputs(uncaught, hard, sibling) -> None:
    """An uncaught soft limit and a hard limit failed their inputs; ``sibling`` (held)
    runs on untouched."""
    with pytest.raises(SoftTimeLimitExceeded):
        uncaught.get(timeout=30)
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=30)
    assert sibling.state == "PENDING"


def terminate_then_finish(limits, rds, terminated, sibling) -> None:
    """Terminate ``terminated`` while it runs; then let ``sibling`` (held) finish."""
    wait_for(lambda: runs(rds, terminated), 30, what="the input to terminate running")
    limits.app.control.revoke(terminated.id, terminate=True)
    with pytest.raises(TaskRevokedError):
        terminated.get(timeout=30)
    rds.set("release", 1)
    assert sibling.get(timeout=30) == "finished"


def each_ran_once_and_was_acked(rds, others, failed) -> None:
    """Every input ran once; ``task_failure`` fired once for each of ``failed`` (a hard
    limit's too); ``acks_late`` acknowledged every one."""
    everything = [*others, *failed]
    assert [runs(rds, r) for r in everything] == [1] * len(everything)
    assert [failures(rds, r) for r in failed] == [1] * len(failed)
    wait_for(lambda: rds.hlen("unacked") == 0, 30, what="every input acknowledged")


def test_limits_on_threads_act_in_the_inputs_own_thread(limits, workers, rds):
    proc = container(workers, LIMITED)
    task = limits.limited
    sibling = task.apply_async(("wait",), time_limit=LONG, soft_time_limit=LONG)
    caught = {
        mode: task.apply_async((mode, LONG, True), soft_time_limit=1) for mode in ("naps", "spin")
    }
    # One long blocking call: the soft limit is raised once it returns, not before.
    caught["sleep"] = task.apply_async(("sleep", 3, True), soft_time_limit=1)
    uncaught = task.apply_async(("naps", LONG), soft_time_limit=1)
    hard = task.apply_async(("naps", LONG), time_limit=1)
    terminated = task.apply_async(("naps", LONG))

    for result in caught.values():
        assert result.get(timeout=30) == "soft limit caught"
    assert float(rds.get(f"caught-after:{caught['sleep'].id}")) >= 3
    limits_failed_only_their_inputs(uncaught, hard, sibling)
    terminate_then_finish(limits, rds, terminated, sibling)
    # The container goes on serving, on every thread it had: none was left stuck.
    assert task.apply_async(("naps", 0.05)).get(timeout=30) == "finished"
    each_ran_once_and_was_acked(rds, [sibling, *caught.values(), terminated], [uncaught, hard])
    assert "recycling the container" not in workers.log_of(proc)


def test_limits_on_asyncio_behave_as_on_threads(limits, workers, rds):
    container(workers, ASYNC_LIMITED)
    task = limits.async_limited
    sibling = task.apply_async(("wait",), time_limit=LONG, soft_time_limit=LONG)
    caught = task.apply_async(("sleep", LONG, True), soft_time_limit=1)
    uncaught = task.apply_async(("sleep", LONG), soft_time_limit=1)
    hard = task.apply_async(("block",), time_limit=1)
    terminated = task.apply_async(("block",))

    assert caught.get(timeout=30) == "soft limit caught"
    limits_failed_only_their_inputs(uncaught, hard, sibling)
    terminate_then_finish(limits, rds, terminated, sibling)
    assert task.apply_async(("sleep", 0.05)).get(timeout=30) == "finished"
    each_ran_once_and_was_acked(rds, [sibling, caught, terminated], [uncaught, hard])


def test_limits_from_the_app_settings_apply_to_both_pools(limits, workers):
    env = {"CC_LIMITS_SOFT": "1"}
    for name in (LIMITED, ASYNC_LIMITED):
        container(workers, name, env=env)
    for task, mode in ((limits.limited, "naps"), (limits.async_limited, "sleep")):
        assert task.delay(mode, LONG, True).get(timeout=30) == "soft limit caught"
        with pytest.raises(SoftTimeLimitExceeded):
            task.delay(mode, LONG).get(timeout=30)
        # A limit given with the call wins over the setting.
        assert task.apply_async((mode, 1.5), soft_time_limit=LONG).get(timeout=30) == "finished"


def test_an_input_blocked_in_a_c_call_recycles_its_container(limits, workers, rds):
    node = workers.start(APP, "-c", "1", "--concurrent-functions", LIMITED)
    task = limits.limited
    siblings = [task.apply_async(("wait",), time_limit=LONG) for _ in range(3)]
    wait_for(lambda: all(runs(rds, r) for r in siblings), 60, what="the siblings running")
    blocked = task.apply_async(("block",), time_limit=1)

    # Failed at its limit, although its thread never returns.
    with pytest.raises(TimeLimitExceeded):
        blocked.get(timeout=30)
    wait_for(
        lambda: "recycling the container" in workers.log_of(node), 30, what="the recycle begun"
    )
    # The container drains: its other inputs finish, each once, then it is replaced.
    assert [r.state for r in siblings] == ["PENDING"] * 3
    rds.set("release", 1)
    assert [r.get(timeout=30) for r in siblings] == ["finished"] * 3
    wait_for(lambda: "recycled: an input overran" in workers.log_of(node), 30, what="a recycle")
    assert task.apply_async(("naps", 0.05)).get(timeout=60) == "finished"

    assert [runs(rds, r) for r in [*siblings, blocked]] == [1] * 4
    assert failures(rds, blocked) == 1
    status = row(limits, LIMITED)
    assert (status["recycles"], status["crashes"]) == (1, 0)
    wait_for(lambda: rds.hlen("unacked") == 0, 30, what="every input acknowledged")


def test_the_issues_function_and_its_chord_give_the_prefork_results(limits, workers):
    # The node runs the chord's body (a plain task) in its own pool.
    workers.start(APP, "-c", "1", "--concurrent-functions", GUARDED)
    # soft_time_limit=1 as a task option; the 2 s sleep gets it when it returns.
    assert limits.guarded.delay(7).get(timeout=60) == 0
    header = [limits.guarded.s(1, 0.01), limits.guarded.s(2), limits.guarded.s(3, 0.01)]
    # What a prefork worker gives: the soft-limited header input returns 0.
    assert chord(header)(limits.collect.s()).get(timeout=60) == [0, 1, 3]


def test_an_exception_raised_into_a_thread_reaches_only_that_thread():
    from celery_concurrent.container.time_limits import raise_in_thread

    stop = threading.Event()
    outcomes: dict[str, str] = {}

    def spin(name: str) -> None:
        try:
            while not stop.is_set():
                pass
            outcomes[name] = "stopped"
        except SoftTimeLimitExceeded:
            outcomes[name] = "soft limit"

    threads = {name: threading.Thread(target=spin, args=(name,)) for name in ("a", "b")}
    for thread in threads.values():
        thread.start()
    assert raise_in_thread(threads["a"].ident, SoftTimeLimitExceeded)
    threads["a"].join(30)
    stop.set()
    threads["b"].join(30)
    assert outcomes == {"a": "soft limit", "b": "stopped"}


def test_deadlines_fire_in_order_and_cancelled_ones_do_not_pile_up():
    from celery_concurrent.container.time_limits import Deadlines

    deadlines = Deadlines()
    fired: list[str] = []
    try:
        for _ in range(1000):
            deadlines.call_later(3600, lambda: fired.append("never")).cancel()
        assert len(deadlines._heap) < 100
        deadlines.call_later(0.2, lambda: fired.append("second"))
        deadlines.call_later(0.1, lambda: fired.append("first"))
        deadlines.call_later(0.15, lambda: fired.append("cancelled")).cancel()
        wait_for(lambda: len(fired) == 2, 30, interval=0.01, what="both deadlines")
        assert fired == ["first", "second"]
    finally:
        deadlines.close()
