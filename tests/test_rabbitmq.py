"""Containers and the supervisor on RabbitMQ (skipped without one, failing under CI)."""

from __future__ import annotations

import time

from celery import group

from .apps.measure import UNTIL_RELEASED
from .support import running, wait_for


def test_container_holds_no_message_beyond_its_slots_on_rabbitmq(rabbitmq):
    rabbitmq.start("--concurrent-function", rabbitmq.app.slow.name)
    store = rabbitmq.app.recorder.store()
    result = group(rabbitmq.app.slow.s("r", UNTIL_RELEASED) for _ in range(30)).apply_async()
    wait_for(lambda: running(store, "r") == 5, 60, what="five running")
    # Five run, none waits in the container: the other 25 are the broker's backlog, for as
    # long as we look.
    for _ in range(5):
        assert rabbitmq.queue_length(rabbitmq.queues[0]) == 25
        time.sleep(0.1)
    rabbitmq.app.recorder.release("r")
    assert result.get(timeout=60) == ["r"] * 30
    assert int(store.get("peak:r")) == 5


def test_async_container_on_rabbitmq(rabbitmq):
    rabbitmq.start("--concurrent-function", rabbitmq.app.aslow.name)
    store = rabbitmq.app.recorder.store()
    result = group(rabbitmq.app.aslow.s("ra", UNTIL_RELEASED) for _ in range(400)).apply_async()
    # Held until released: the container fills its 200 slots at whatever pace it can.
    wait_for(lambda: running(store, "ra") == 200, 60, what="200 in flight")
    rabbitmq.app.recorder.release("ra")
    assert result.get(timeout=60) == ["ra"] * 400
    assert int(store.get("peak:ra")) == 200


def test_supervisor_scales_on_the_rabbitmq_backlog(rabbitmq):
    rabbitmq.start("-c", "1", "--concurrent-functions", rabbitmq.app.slow.name)
    store = rabbitmq.app.recorder.store()
    result = group(rabbitmq.app.slow.s("rs", UNTIL_RELEASED) for _ in range(45)).apply_async()
    # max_inputs=5, max_containers=3: 15 at once once it has scaled up.
    wait_for(lambda: running(store, "rs") == 15, 60, what="three containers busy")
    rabbitmq.app.recorder.release("rs")
    assert result.get(timeout=60) == ["rs"] * 45
    assert int(store.get("peak:rs")) == 15
