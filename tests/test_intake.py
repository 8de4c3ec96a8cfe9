"""Intake on Redis: a container takes up to its free slots in one round trip.

The take script against a real Redis, with messages that the test app really published
(kombu's own format), and real containers: the take is used, holds no message beyond
the free slots, and a container killed in the middle of taking loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from celery import group
from kombu.utils.json import loads

from celery_concurrent.container.intake import TAKE

from .apps.measure import UNTIL_RELEASED
from .support import running, wait_for

SLEEPY = "tests.apps.basic.sleepy"
QUEUE = f"concurrent.{SLEEPY}"
#: kombu's Redis lists of one queue, highest priority first (priority_steps 0, 3, 6, 9)
SEP = "\x06\x16"


def lists(queue: str) -> list[str]:
    return [queue, *(f"{queue}{SEP}{pri}" for pri in (3, 6, 9))]


def take(rds, queue: str, n: int, now: float = 1000.0, prefix: str = "") -> list[list]:
    keys = [prefix + key for key in (*lists(queue), "unacked", "unacked_index")]
    return rds.eval(TAKE, len(keys), *keys, n, now)


def publish(basic_app, count: int, priority: int | None = None) -> list[str]:
    results = [basic_app.sleepy.apply_async(("k", 0), priority=priority) for _ in range(count)]
    return [r.id for r in results]


def task_id(payload: bytes) -> str:
    return loads(payload)["headers"]["id"]


def test_take_pops_in_order_and_books_each_as_kombu_does(basic_app, rds):
    ids = publish(basic_app, 5)
    reply = take(rds, QUEUE, 3, now=1234.5)
    assert [task_id(payload) for _, _, payload in reply] == ids[:3]
    assert all(number == 1 and booked == 1 for number, booked, _ in reply)
    assert rds.llen(QUEUE) == 2
    for _, _, payload in reply:
        message = loads(payload)
        tag = message["properties"]["delivery_tag"]
        info = message["properties"]["delivery_info"]
        # kombu's QoS.append: [the message, exchange, routing key], scored by the clock.
        assert json.loads(rds.hget("unacked", tag)) == [
            message,
            info["exchange"],
            info["routing_key"],
        ]
        assert rds.zscore("unacked_index", tag) == 1234.5
    assert rds.hlen("unacked") == rds.zcard("unacked_index") == 3


def test_take_stops_at_what_the_queue_holds(basic_app, rds):
    publish(basic_app, 2)
    assert len(take(rds, QUEUE, 50)) == 2
    assert take(rds, QUEUE, 50) == []
    assert rds.hlen("unacked") == 2


def test_take_serves_the_highest_priority_first(basic_app, rds):
    low = publish(basic_app, 2, priority=9)
    high = publish(basic_app, 2, priority=0)
    reply = take(rds, QUEUE, 3)
    assert [task_id(p) for _, _, p in reply] == [*high, low[0]]
    # The list each came from, so that it is delivered as its queue's.
    assert [number for number, _, _ in reply] == [1, 1, 4]


def test_a_message_the_script_cannot_read_is_handed_over_unbooked(basic_app, rds):
    rds.lpush(QUEUE, b"not json")
    rds.lpush(QUEUE, b'{"properties":{}}')
    ids = publish(basic_app, 1)
    reply = take(rds, QUEUE, 10)
    assert [(booked, payload) for _, booked, payload in reply[:2]] == [
        (0, b"not json"),
        (0, b'{"properties":{}}'),
    ]
    assert reply[2][1] == 1 and task_id(reply[2][2]) == ids[0]
    assert rds.hlen("unacked") == 1


def test_take_with_a_global_key_prefix(basic_app, rds):
    ids = publish(basic_app, 2)
    rds.rename(QUEUE, f"app1:{QUEUE}")
    reply = take(rds, QUEUE, 5, prefix="app1:")
    assert [task_id(p) for _, _, p in reply] == ids
    assert rds.hlen("app1:unacked") == 2 and rds.zcard("app1:unacked_index") == 2
    assert not rds.exists("unacked")


def test_two_takes_at_once_never_take_one_message_twice(basic_app, rds, broker_url):
    import threading

    import redis

    publish(basic_app, 400)
    seen: list[str] = []
    lock = threading.Lock()

    def taker() -> None:
        client = redis.Redis.from_url(broker_url)
        while reply := take(client, QUEUE, 7):
            with lock:
                seen.extend(task_id(p) for _, _, p in reply)

    threads = [threading.Thread(target=taker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == len(set(seen)) == 400
    assert rds.hlen("unacked") == 400


def commands(rds, name: str) -> int:
    return int(rds.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_a_container_takes_a_backlog_in_few_round_trips(basic_app, workers, rds):
    calls = group(basic_app.sleepy.s("b", UNTIL_RELEASED) for _ in range(120)).apply_async()
    rpops, brpops = commands(rds, "rpop"), commands(rds, "brpop")
    workers.start("tests.apps.basic", "--concurrent-function", SLEEPY)
    wait_for(lambda: running(rds, "b") == 50, 60, what="50 inputs running")
    # Redis counts the commands a script runs: the 50 slots were filled by the take's
    # RPOPs, not by 50 BRPOPs (held inputs free no slot meanwhile, so no one-slot refill
    # uses kombu's BRPOP; the few BRPOPs are Celery's own, mingle's replies).
    rpops, brpops = commands(rds, "rpop") - rpops, commands(rds, "brpop") - brpops
    assert rpops >= 50 and brpops < 10, (rpops, brpops)
    assert rds.llen(QUEUE) == 70
    basic_app.recorder.release("b")
    assert calls.get(timeout=60) == ["b"] * 120
    # Every message acknowledged: nothing left booked.
    wait_for(lambda: rds.hlen("unacked") == 0, 10, what="every ack sent")


def test_a_take_never_holds_more_than_the_free_slots(basic_app, workers, rds):
    workers.start("tests.apps.basic", "--concurrent-function", SLEEPY)
    first = group(basic_app.sleepy.s("h1", UNTIL_RELEASED) for _ in range(30)).apply_async()
    wait_for(lambda: running(rds, "h1") == 30, 60, what="30 inputs running")
    # 20 slots free: a backlog of 100 gives the container 20, not one more.
    second = group(basic_app.sleepy.s("h2", UNTIL_RELEASED) for _ in range(100)).apply_async()
    wait_for(lambda: running(rds, "h2") == 20, 60, what="20 more running")
    for _ in range(5):
        assert rds.llen(QUEUE) == 80
        assert rds.hlen("unacked") <= 50
        time.sleep(0.1)
    basic_app.recorder.release("h1")
    basic_app.recorder.release("h2")
    assert first.get(timeout=60) == ["h1"] * 30
    assert second.get(timeout=60) == ["h2"] * 100


@pytest.mark.parametrize("after", [0.05, 0.3])
def test_a_container_killed_while_taking_loses_nothing(basic_app, workers, rds, after):
    late = "tests.apps.basic.late_sleepy"
    calls = group(basic_app.late_sleepy.s("x", 0.2) for _ in range(400)).apply_async()
    proc = workers.start("tests.apps.basic", "--concurrent-function", late, wait_ready=False)
    wait_for(lambda: rds.llen(f"concurrent.{late}") < 400, 60, what="the first take")
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # Each message is in the queue or booked as unacknowledged until its ack (after its
    # result, acks_late), never neither.
    done = sum(1 for call in calls.results if call.ready())
    assert rds.llen(f"concurrent.{late}") + rds.hlen("unacked") + done >= 400
    # kombu's restore, at once (as the visibility timeout or the sweep would later).
    for tag, entry in rds.hgetall("unacked").items():
        payload, _exchange, routing_key = json.loads(entry)
        rds.lpush(routing_key, json.dumps(payload))
        rds.hdel("unacked", tag)
        rds.zrem("unacked_index", tag)
    workers.start("tests.apps.basic", "--concurrent-function", late)
    assert calls.get(timeout=90) == ["x"] * 400


def test_a_slot_takes_its_next_input_while_the_last_one_stores_its_outcome(basic_app, workers, rds):
    workers.start("tests.apps.basic", "--concurrent-function", "tests.apps.basic.one_slot")
    basic_app.one_slot.delay("warm", 0).get(timeout=30)
    first = basic_app.one_slot.delay("first", 2.0)
    second = basic_app.one_slot.delay("second", 0)
    assert second.get(timeout=30) == "second"
    assert first.get(timeout=30) == "first"
    # One slot: never two functions at once, but the second input started while the
    # first one's tracer was still at its work after the function returned (its
    # task_success handler lingering, as a slow result backend would).
    assert int(rds.get("peak:first") or 0) == 1
    started_second = float(rds.lrange("started:second", 0, -1)[0])
    # first.get() returned once its result was stored; the handler ends after that.
    wait_for(lambda: rds.llen("stored:first"), 30, what="the first input's tracer to end")
    stored_first = float(rds.lrange("stored:first", 0, -1)[0])
    assert started_second < stored_first
