"""Container leases and held messages: the Lua scripts, on the session's private Redis.

Short TTLs (a fraction of a second to a second) let leases lapse within a test; every
wait is on a condition, with generous timeouts, so that a loaded machine only makes the
tests slower.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport.redis import MutexHeld

from celery_concurrent.constants import RESTORE_MUTEX_SECONDS
from celery_concurrent.held_messages import HeldMessages, UnackedKeys
from celery_concurrent.leases import ContainerLeases, ContainerLoad, spec_digest
from celery_concurrent.spec import FunctionSpec
from celery_concurrent.supervisor.redelivery import Redelivery, restorers_mutex

from .support import wait_for

FUNCTION = "proj.fetch"
#: a lease that outlives any test
LONG = 60.0
#: a lease that lapses within a test
SHORT = 0.3


def node(i: int) -> str:
    return f"{FUNCTION}-{i}@host"


def load(in_flight: int = 0, idle_s: float = 0.0, ready: bool = True) -> ContainerLoad:
    return ContainerLoad(
        node="celery@host", in_flight=in_flight, idle_s=idle_s, ready=ready, spec_digest="d1"
    )


def redis_now(rds: redis.Redis) -> float:
    seconds, micros = rds.time()
    return seconds + micros / 1e6


def run_threads(targets: list[Callable[[], None]]) -> None:
    """Run ``targets`` at once, each on its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a racing thread hung"
    if errors:
        raise errors[0]


@pytest.fixture
def leases(rds: redis.Redis) -> ContainerLeases:
    return ContainerLeases(rds, FUNCTION)


# -- container leases ---------------------------------------------------------------------


def test_acquire_admits_containers_up_to_the_limit_and_refuses_more(leases):
    assert [leases.acquire(node(i), limit=3, ttl=LONG) for i in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert set(leases.live()) == {node(0), node(1), node(2)}
    assert leases.count() == 3


def test_acquire_by_a_holder_renews_its_lease_even_at_the_limit(leases):
    assert leases.acquire(node(0), limit=1, ttl=2.0)
    assert leases.acquire(node(0), limit=1, ttl=LONG)
    assert leases.live()[node(0)] > LONG - 10


def test_unbounded_acquire_admits_every_container_and_counts_it(leases):
    assert all(leases.acquire(node(i), limit=None, ttl=LONG) for i in range(20))
    assert leases.count() == 20


def test_limit_zero_admits_no_container(leases):
    assert not leases.acquire(node(0), limit=0, ttl=LONG)
    assert leases.count() == 0


def test_unrenewed_lease_expires_and_frees_its_place(leases):
    assert leases.acquire(node(0), limit=1, ttl=SHORT)
    assert not leases.acquire(node(1), limit=1, ttl=LONG)
    wait_for(lambda: leases.count() == 0, timeout=30, what="the lease to expire")
    assert leases.acquire(node(1), limit=1, ttl=LONG)
    assert set(leases.live()) == {node(1)}


def test_renewal_extends_a_lease_past_its_first_ttl(leases):
    assert leases.acquire(node(0), limit=1, ttl=2.0)
    assert leases.renew(node(0), ttl=LONG)
    assert leases.live()[node(0)] > LONG - 10
    time.sleep(2.5)
    assert node(0) in leases.live()
    assert not leases.acquire(node(1), limit=1, ttl=LONG)


def test_renewal_of_a_lapsed_lease_is_refused(leases):
    assert leases.acquire(node(0), limit=1, ttl=SHORT)
    wait_for(lambda: node(0) not in leases.live(), timeout=30, what="the lease to lapse")
    assert not leases.renew(node(0), ttl=LONG)
    assert leases.count() == 0
    # Its place went to another container meanwhile: re-acquiring is refused too.
    assert leases.acquire(node(1), limit=1, ttl=LONG)
    assert not leases.acquire(node(0), limit=1, ttl=LONG)


def test_renewal_of_a_lease_never_taken_is_refused(leases):
    assert not leases.renew(node(0), ttl=LONG, load=load())
    assert leases.count() == 0
    assert leases.cluster_load() == {}


def test_release_keeps_min_containers_over_the_cluster(leases):
    for i in range(3):
        assert leases.acquire(node(i), limit=None, ttl=LONG)
    assert leases.release(node(0), keep=1)
    assert leases.release(node(1), keep=1)
    assert not leases.release(node(2), keep=1)
    assert set(leases.live()) == {node(2)}


def test_release_counts_only_live_leases_toward_keep(leases):
    assert leases.acquire(node(0), limit=None, ttl=LONG)
    assert leases.acquire(node(1), limit=None, ttl=SHORT)
    wait_for(lambda: leases.count() == 1, timeout=30, what="the short lease to lapse")
    assert not leases.release(node(0), keep=1)
    assert node(0) in leases.live()


def test_release_of_a_member_without_a_lease_releases_nothing(leases):
    assert leases.acquire(node(0), limit=None, ttl=LONG)
    assert not leases.release(node(1), keep=0)
    assert leases.count() == 1


def test_release_to_zero_keep_lets_the_last_container_go(leases):
    assert leases.acquire(node(0), limit=None, ttl=LONG, load=load())
    assert leases.release(node(0), keep=0)
    assert leases.count() == 0
    assert leases.cluster_load() == {}


def test_drop_removes_an_exited_containers_lease_and_load_whatever_remains(leases):
    assert leases.acquire(node(0), limit=None, ttl=LONG, load=load())
    assert leases.drop(node(0))
    assert leases.count() == 0
    assert leases.cluster_load() == {}
    assert not leases.drop(node(0))


def test_expired_leases_are_pruned_with_their_load_records(leases, rds):
    assert leases.acquire(node(0), limit=None, ttl=LONG, load=load())
    assert leases.acquire(node(1), limit=None, ttl=SHORT, load=load())
    wait_for(lambda: leases.count() == 1, timeout=30, what="the short lease to expire")
    # Expired but not yet pruned: a read leaves the set as it is.
    assert rds.zcard(leases.leases_key) == 2
    assert leases.acquire(node(2), limit=None, ttl=LONG, load=load())
    assert {m.decode() for m in rds.zrange(leases.leases_key, 0, -1)} == {node(0), node(2)}
    assert {m.decode() for m in rds.hkeys(leases.loads_key)} == {node(0), node(2)}


def test_lease_keys_expire_with_their_last_lease(leases, rds):
    assert leases.acquire(node(0), limit=None, ttl=2.0, load=load())
    for key in (leases.leases_key, leases.loads_key):
        assert 0 < rds.pttl(key) <= 2000
    assert leases.renew(node(0), ttl=LONG, load=load())
    assert rds.pttl(leases.leases_key) > 2000
    assert leases.acquire(node(1), limit=None, ttl=SHORT)
    wait_for(lambda: leases.count() == 1, timeout=30, what="the short lease to expire")
    assert rds.pttl(leases.leases_key) > 2000


def test_function_without_containers_leaves_no_keys(leases, rds):
    assert leases.acquire(node(0), limit=None, ttl=SHORT, load=load())
    wait_for(lambda: not rds.exists(leases.leases_key, leases.loads_key), timeout=30)
    assert leases.count() == 0


def test_functions_lease_apart(rds):
    fetch = ContainerLeases(rds, "proj.fetch")
    ask = ContainerLeases(rds, "proj.ask")
    assert fetch.acquire("proj.fetch-1@host", limit=1, ttl=LONG)
    assert ask.acquire("proj.ask-1@host", limit=1, ttl=LONG)
    assert fetch.count() == ask.count() == 1


def test_cluster_load_gives_the_live_containers_records_with_their_age(leases):
    assert leases.acquire(node(0), limit=None, ttl=LONG, load=load(in_flight=4))
    assert leases.acquire(node(1), limit=None, ttl=LONG, load=load(idle_s=5.0))
    assert leases.acquire(node(2), limit=None, ttl=LONG)  # no record written yet
    assert leases.acquire(node(3), limit=None, ttl=SHORT, load=load(in_flight=9))
    wait_for(lambda: node(3) not in leases.live(), timeout=30, what="the short lease to lapse")
    assert leases.renew(node(1), ttl=LONG, load=load(idle_s=6.0))

    loads = leases.cluster_load()
    assert loads == {node(0): load(in_flight=4), node(1): load(idle_s=6.0)}
    assert all(record.age_s >= 0 for record in loads.values())
    assert loads[node(0)].idle_now == 0.0
    assert loads[node(1)].idle_now >= 6.0


def test_load_record_encodes_and_decodes_without_its_age():
    record = ContainerLoad("celery@a", in_flight=3, idle_s=1.5, ready=False, spec_digest="x")
    assert "age_s" not in record.encode()
    back = ContainerLoad.decode(record.encode(), age_s=2.0)
    assert back == record
    assert back.age_s == 2.0
    assert ContainerLoad.decode(record.encode().encode()) == record
    # A field written by a newer node is ignored.
    assert ContainerLoad.decode({**json.loads(record.encode()), "gpus": 2}) == record


def test_spec_digest_tells_apart_specs_that_differ():
    spec = FunctionSpec.from_options(FUNCTION, {"max_containers": 3})
    assert spec_digest(spec) == spec_digest(
        FunctionSpec.from_options(FUNCTION, {"max_containers": 3})
    )
    assert spec_digest(spec) != spec_digest(spec.with_bounds(max_containers=4))


def test_racing_acquires_from_two_clients_never_exceed_the_limit(broker_url):
    clients = [redis.Redis.from_url(broker_url) for _ in range(2)]
    sides = [ContainerLeases(client, FUNCTION) for client in clients]
    members = [node(i) for i in range(8)]
    won: list[str] = []
    start = threading.Barrier(len(members))

    def take_once(i: int) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            if sides[i % 2].acquire(members[i], limit=3, ttl=LONG):
                won.append(members[i])

        return run

    run_threads([take_once(i) for i in range(len(members))])
    assert len(won) == 3
    assert set(sides[0].live()) == set(won)
    for member in won:
        assert sides[0].drop(member)

    seen: list[int] = []
    done = threading.Event()

    def hammer(i: int) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            for _ in range(150):
                if sides[i % 2].acquire(members[i], limit=3, ttl=LONG):
                    seen.append(sides[(i + 1) % 2].count())
                    sides[i % 2].drop(members[i])

        return run

    def watch() -> None:
        while not done.is_set():
            seen.append(clients[0].zcard(sides[0].leases_key))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_threads([hammer(i) for i in range(len(members))])
    finally:
        done.set()
        watcher.join(timeout=30)
    assert seen and max(seen) <= 3
    assert sides[0].count() == 0


# -- held messages -------------------------------------------------------------------------


def deliver(
    rds: redis.Redis, *tags: str, at: float = 1000.0, routing_key: str = "q"
) -> UnackedKeys:
    """Put ``tags`` in kombu's default unacked keys, as delivered at ``at`` (long ago)."""
    keys = UnackedKeys()
    for tag in tags:
        rds.hset(keys.payloads, tag, json.dumps([{}, "", routing_key]))
        rds.zadd(keys.index, {tag: at})
    return keys


def test_renew_held_moves_only_still_unacked_tags_to_now(rds):
    keys = deliver(rds, "t1", "t2")
    held = HeldMessages(rds, keys)
    before = redis_now(rds)
    assert held.renew(["t1", "t2", "acked"]) == ["t1", "t2"]
    after = redis_now(rds)
    for tag in ("t1", "t2"):
        assert before <= rds.zscore(keys.index, tag) <= after
    # A tag acknowledged (or restored) meanwhile is not put back in the index.
    assert rds.zscore(keys.index, "acked") is None


def test_renew_held_skips_a_tag_whose_payload_is_gone(rds):
    keys = deliver(rds, "t1", "t2")
    rds.hdel(keys.payloads, "t2")  # kombu's channel._restore drops the payload only
    held = HeldMessages(rds, keys)
    assert held.renew(["t1", "t2"]) == ["t1"]
    assert rds.zscore(keys.index, "t2") == 1000.0


def test_renew_held_skips_a_tag_taken_out_of_the_index(rds):
    keys = deliver(rds, "t1")
    rds.zrem(keys.index, "t1")  # restore_by_tag takes it out of the index first
    assert HeldMessages(rds, keys).renew(["t1"]) == []
    assert rds.zscore(keys.index, "t1") is None


def test_renew_of_nothing_is_no_round_trip(rds):
    assert HeldMessages(rds).renew([]) == []


def test_orphans_are_the_old_tags_of_our_queues_only(rds):
    deliver(rds, "old-ours", routing_key="concurrent.proj.fetch")
    deliver(rds, "old-plain", routing_key="celery")
    deliver(rds, "new-ours", at=redis_now(rds), routing_key="concurrent.proj.fetch")
    held = HeldMessages(rds)
    assert held.orphans(["concurrent.proj.fetch"], older_than=LONG) == ["old-ours"]
    assert held.orphans([], older_than=LONG) == []
    assert sorted(held.orphans(["concurrent.proj.fetch", "celery"], older_than=LONG)) == [
        "old-ours",
        "old-plain",
    ]


def test_a_renewed_tag_is_no_orphan_until_it_stops_being_renewed(rds):
    keys = deliver(rds, "t1", routing_key="cq")
    held = HeldMessages(rds, keys)
    assert held.renew(["t1"]) == ["t1"]
    assert held.orphans(["cq"], older_than=SHORT * 3) == []
    wait_for(
        lambda: held.orphans(["cq"], older_than=SHORT) == ["t1"],
        timeout=30,
        what="the unrenewed tag to become an orphan",
    )


def test_an_orphan_whose_payload_is_gone_or_unreadable_is_left_alone(rds):
    keys = deliver(rds, "gone", "garbled", routing_key="cq")
    rds.hdel(keys.payloads, "gone")
    rds.hset(keys.payloads, "garbled", "not json")
    assert HeldMessages(rds, keys).orphans(["cq"], older_than=LONG) == []


def test_a_sweep_looks_at_most_at_its_scan_limit(rds):
    deliver(rds, *(f"t{i}" for i in range(20)), routing_key="cq")
    assert len(HeldMessages(rds).orphans(["cq"], older_than=LONG, limit=5)) == 5


# -- with kombu's Redis transport ---------------------------------------------------------


#: kombu's visibility timeout in the end-to-end tests: seconds, not an hour
VISIBILITY_TIMEOUT = 2.0


def exchange_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def publish_and_fetch(conn: Connection, queue: Queue, *bodies: dict) -> list:
    """Publish ``bodies`` on ``queue`` and fetch each without acknowledging it."""
    channel = conn.default_channel
    producer = conn.Producer(channel)
    for body in bodies:
        producer.publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )
    messages = [channel.basic_get(queue.name, no_ack=False) for _ in bodies]
    assert all(messages)
    return messages


def drain(channel, queue: Queue) -> list[dict]:
    bodies = []
    while (message := channel.basic_get(queue.name, no_ack=True)) is not None:
        bodies.append(message.payload)
    return bodies


def test_renewed_message_outlives_visibility_timeout_and_comes_back_once_unrenewed(broker_url, rds):
    from celery import Celery

    from celery_concurrent.supervisor.redelivery import Redelivery

    queue = exchange_queue("cc-leases-e2e")
    options = {"visibility_timeout": VISIBILITY_TIMEOUT}
    with Connection(broker_url, transport_options=options) as conn:
        channel = conn.default_channel
        # The holder dies: its channel puts nothing back when it closes.
        channel.qos.restore_at_shutdown = False
        renewed, control = publish_and_fetch(conn, queue, {"n": "renewed"}, {"n": "control"})
        held = HeldMessages.for_channel(channel)
        fetched = time.monotonic()

        # Renewed, it stays unacknowledged past visibility_timeout; the control does not.
        # A round counts only if restore_visible ran well within visibility_timeout of
        # the renewal (a loaded machine may stall between them); one must, well past it.
        checked = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            checked and time.monotonic() - fetched > VISIBILITY_TIMEOUT * 2
        ):
            assert held.renew([renewed.delivery_tag]) == [renewed.delivery_tag]
            renewed_at = time.monotonic()
            channel.qos.restore_visible(interval=1)
            if time.monotonic() - renewed_at < VISIBILITY_TIMEOUT / 2:
                assert rds.hexists(channel.unacked_key, renewed.delivery_tag)
                checked = checked or time.monotonic() - fetched > VISIBILITY_TIMEOUT * 1.5
            time.sleep(0.3)
        assert checked, "restore_visible never ran soon after a renewal"
        wait_for(
            lambda: channel.qos.restore_visible(interval=1) or rds.llen(queue.name),
            timeout=30,
            what="the control message to be restored",
        )
        assert drain(channel, queue) == [control.payload]
        assert rds.hexists(channel.unacked_key, renewed.delivery_tag)

        # It stops being renewed: a sweep finds it, and it is put back exactly once.
        wait_for(
            lambda: held.orphans([queue.routing_key], older_than=SHORT),
            timeout=30,
            what="the unrenewed message to become an orphan",
        )
        (tag,) = held.orphans([queue.routing_key], older_than=SHORT)
        assert tag == renewed.delivery_tag
        redelivery = Redelivery(Celery(broker=broker_url))
        try:
            # Two nodes sweep the same orphan: one puts it back.
            assert [redelivery.restore([tag]), redelivery.restore([tag])] == [1, 0]
        finally:
            redelivery.close()
        assert held.orphans([queue.routing_key], older_than=SHORT) == []
        assert drain(channel, queue) == [renewed.payload]


def test_held_messages_follow_kombus_global_keyprefix(broker_url, rds):
    from celery import Celery

    from celery_concurrent.supervisor.redelivery import Redelivery

    queue = exchange_queue("cc-leases-prefixed")
    options = {"global_keyprefix": "pfx:", "visibility_timeout": VISIBILITY_TIMEOUT}
    with Connection(broker_url, transport_options=options) as conn:
        channel = conn.default_channel
        channel.qos.restore_at_shutdown = False
        (message,) = publish_and_fetch(conn, queue, {"n": 1})
        held = HeldMessages.for_channel(channel)
        assert held.unacked == UnackedKeys("pfx:unacked_index", "pfx:unacked")

        before = redis_now(rds)
        assert held.renew([message.delivery_tag]) == [message.delivery_tag]
        assert rds.zscore("pfx:unacked_index", message.delivery_tag) >= before

        wait_for(
            lambda: held.orphans([queue.routing_key], older_than=SHORT),
            timeout=30,
            what="the message to become an orphan",
        )
        (tag,) = held.orphans([queue.routing_key], older_than=SHORT)
        app = Celery(broker=broker_url)
        app.conf.broker_transport_options = options
        redelivery = Redelivery(app)
        try:
            # The supervisor's own redelivery path reads the prefixed keys too.
            assert redelivery.restore([tag]) == 1
        finally:
            redelivery.close()
        assert rds.llen(f"pfx:{queue.name}") == 1
        assert drain(channel, queue) == [message.payload]


def test_a_restore_cut_off_with_the_mutex_held_blocks_the_others_briefly(basic_app, rds):
    cut_off, other = Redelivery(basic_app.app), Redelivery(basic_app.app)
    try:
        channel = cut_off._ensure_channel()
        # A give-back (or a sweep) holds kombu's restore mutex when the broker restarts:
        # its release never runs, and a saved snapshot keeps the key.
        held = restorers_mutex(channel)
        held.__enter__()
        key = channel.unacked_mutex_key
        assert 0 < rds.ttl(key) <= RESTORE_MUTEX_SECONDS  # not kombu's 300 s
        # Meanwhile another restorer backs off and tries again at its next turn.
        assert other.restore(["some-tag"]) is None
        with pytest.raises(MutexHeld):
            restorers_mutex(other._ensure_channel()).__enter__()
        rds.delete(key)  # as its expiry would
        assert other.restore(["some-tag"]) == 0  # not unacknowledged: nothing to put back
    finally:
        cut_off.close()
        other.close()
