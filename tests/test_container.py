"""A container: a real ``celery worker`` process that runs one function's inputs at once.

Every test here runs real worker subprocesses against a private Redis server.
"""

from __future__ import annotations

import time

import pytest
from celery import group
from celery.exceptions import TaskRevokedError, TimeLimitExceeded

from .apps.measure import UNTIL_RELEASED
from .support import running, thread_count, wait_for

SLEEPY = "tests.apps.basic.sleepy"
ASYNC_SLEEPY = "tests.apps.basic.async_sleepy"
BEHAVIOUR = "tests.apps.basic.async_behaviour"


def container(workers, name, *args):
    return workers.start("tests.apps.basic", "--concurrent-function", name, *args)


def test_sync_container_runs_n_inputs_at_once_on_threads(basic_app, workers, rds):
    container(workers, SLEEPY)
    result = group(basic_app.sleepy.s("k", UNTIL_RELEASED) for _ in range(120)).apply_async()
    # Held until released: all 50 slots fill, however slowly the container takes them in.
    wait_for(lambda: running(rds, "k") == 50, 60, what="50 inputs running at once")
    basic_app.recorder.release("k")
    assert result.get(timeout=60) == ["k"] * 120
    assert int(rds.get("peak:k")) == 50


def test_container_holds_no_message_beyond_its_slots(basic_app, workers, rds):
    container(workers, SLEEPY)
    queue = "concurrent.tests.apps.basic.sleepy"
    result = group(basic_app.sleepy.s("hold", UNTIL_RELEASED) for _ in range(120)).apply_async()
    wait_for(lambda: running(rds, "hold") == 50, 60, what="50 inputs running")
    # 50 running, none waiting in the container: the rest is the broker's backlog, for
    # as long as we look (a prefetch would show within a few of the consumer's polls).
    for _ in range(5):
        assert rds.llen(queue) == 70
        assert rds.hlen("unacked") <= 50
        time.sleep(0.1)
    basic_app.recorder.release("hold")
    assert result.get(timeout=60) == ["hold"] * 120


def test_async_container_runs_thousands_of_inputs_on_one_loop_thread(basic_app, workers, rds):
    proc = container(workers, ASYNC_SLEEPY)
    result = group(basic_app.async_sleepy.s("a", UNTIL_RELEASED) for _ in range(3000)).apply_async()
    most_threads = 0

    def all_slots_busy() -> bool:
        nonlocal most_threads
        most_threads = max(most_threads, thread_count(proc.pid))
        return running(rds, "a") == 2000

    # Held until released: the container fills its 2000 slots at whatever pace it can.
    wait_for(all_slots_busy, 90, interval=0.05, what="2000 async inputs in flight")
    most_threads = max(most_threads, thread_count(proc.pid))
    basic_app.recorder.release("a")
    assert result.get(timeout=90) == ["a"] * 3000
    # Thousands in flight at once, on a handful of threads: no thread per input.
    assert most_threads < 30, most_threads
    assert int(rds.get("peak:a")) == 2000


def test_gevent_container_runs_inputs_on_greenlets(basic_app, workers, rds):
    workers.start(
        "tests.apps.basic", "-P", "gevent", "--concurrent-function", "tests.apps.basic.green_sleepy"
    )
    result = group(basic_app.green_sleepy.s("g", UNTIL_RELEASED) for _ in range(40)).apply_async()
    wait_for(lambda: running(rds, "g") == 10, 60, what="10 inputs running at once")
    basic_app.recorder.release("g")
    assert result.get(timeout=30) == ["g"] * 40
    assert int(rds.get("peak:g")) == 10


def test_gevent_container_without_gevent_flag_fails_clearly(workers):
    proc = workers.start(
        "tests.apps.basic",
        "--concurrent-function",
        "tests.apps.basic.green_sleepy",
        wait_ready=False,
    )
    proc.wait(30)
    assert proc.returncode != 0
    assert "-P gevent" in workers.log_of(proc)


def test_unknown_function_name_is_a_clear_error(workers):
    proc = workers.start(
        "tests.apps.basic", "--concurrent-function", "tests.apps.basic.nope", wait_ready=False
    )
    proc.wait(30)
    assert proc.returncode != 0
    assert "'tests.apps.basic.nope' is not a @concurrent function" in workers.log_of(proc)


class TestAsyncInputsKeepCeleryBehaviour:
    @pytest.fixture
    def behaviour(self, basic_app, workers):
        container(workers, BEHAVIOUR)
        return basic_app.async_behaviour

    def test_bound_request_is_the_inputs_own(self, behaviour):
        # Ten at once on one loop: each coroutine still sees its own request.
        results = [behaviour.delay("request", 0.05 * (i % 3)) for i in range(10)]
        for sent in results:
            seen = sent.get(timeout=20)
            assert seen["id"] == sent.id
            assert seen["args"][0] == "request"
            assert seen["hostname"].startswith(BEHAVIOUR)

    def test_result_and_state_are_stored(self, behaviour):
        sent = behaviour.delay("echo")
        assert sent.get(timeout=20) == "echo"
        assert sent.state == "SUCCESS"

    def test_exception_is_a_failure_with_its_traceback(self, behaviour):
        sent = behaviour.delay("fail")
        with pytest.raises(KeyError):
            sent.get(timeout=20)
        assert sent.state == "FAILURE"
        assert "async boom" in sent.traceback
        assert "async_behaviour" in sent.traceback

    def test_retry_works_from_a_coroutine(self, behaviour):
        assert behaviour.delay("retry").get(timeout=20) == 2

    def test_task_signals_fire(self, behaviour, rds):
        ok = behaviour.delay("echo")
        ok.get(timeout=20)
        bad = behaviour.delay("fail")
        with pytest.raises(KeyError):
            bad.get(timeout=20)

        def signals_of(sent) -> list[bytes] | None:
            # task_postrun fires after the result is stored: wait for the last signal.
            seen = rds.lrange(f"signals:{sent.id}", 0, -1)
            return seen if seen[-1:] == [b"task_postrun"] else None

        assert wait_for(lambda: signals_of(ok), 20, what="ok's signals") == [
            b"task_prerun",
            b"task_success",
            b"task_postrun",
        ]
        assert wait_for(lambda: signals_of(bad), 20, what="bad's signals") == [
            b"task_prerun",
            b"task_failure",
            b"task_postrun",
        ]

    def test_revoked_input_does_not_run(self, behaviour, basic_app):
        # Its ETA is far enough ahead for the revoke to reach a container on a loaded machine.
        sent = behaviour.apply_async(("echo",), countdown=3)
        basic_app.app.control.revoke(sent.id)
        with pytest.raises(TaskRevokedError):
            sent.get(timeout=30)
        assert sent.state == "REVOKED"


def test_hard_time_limit_cancels_the_coroutine(basic_app, workers):
    container(workers, "tests.apps.basic.async_hard_limited")
    # time_limit=1 on a coroutine that would sleep for a minute: the failure comes long
    # before it could have finished by itself, so the coroutine was cut off at the limit.
    sent = basic_app.async_hard_limited.delay(60)
    with pytest.raises(TimeLimitExceeded):
        sent.get(timeout=30)
    assert basic_app.async_hard_limited.delay(0.01).get(timeout=20) == "finished"


def test_soft_time_limit_is_raised_inside_the_coroutine(basic_app, workers):
    container(workers, "tests.apps.basic.async_soft_limited")
    assert basic_app.async_soft_limited.delay(5).get(timeout=20) == "soft limit caught"
    assert basic_app.async_soft_limited.delay(0.01).get(timeout=20) == "finished"


def test_plain_worker_runs_concurrent_async_tasks_to_completion(basic_app, workers):
    workers.start(
        "tests.apps.basic",
        "-P",
        "threads",
        "-c",
        "2",
        "-Q",
        "celery,concurrent.tests.apps.basic.async_behaviour",
    )
    assert basic_app.async_behaviour.delay("echo").get(timeout=20) == "echo"


@pytest.mark.parametrize(
    ("given", "max_inputs", "expected"),
    [(None, 1, 11), (None, 100, 110), (500, 100, 500), (20, 100, 110)],
)
def test_a_containers_redis_pool_has_a_connection_for_every_slot(given, max_inputs, expected):
    from celery import Celery

    from celery_concurrent import FunctionSpec
    from celery_concurrent.container.worker import room_for_every_slot

    app = Celery("pool", set_as_current=False)
    if given is not None:
        app.conf.broker_transport_options = {"max_connections": given, "visibility_timeout": 9}
    room_for_every_slot(app, FunctionSpec.from_options("proj.fetch", {"max_inputs": max_inputs}))
    assert app.conf.broker_transport_options["max_connections"] == expected
    if given is not None:
        assert app.conf.broker_transport_options["visibility_timeout"] == 9
