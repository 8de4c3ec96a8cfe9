"""Container leases and held-message leases: the Lua scripts, on the session's private Redis.

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

from celery_concurrent.held_leases import HeldLeases, UnackedKeys, holder_name
from celery_concurrent.leases import ContainerLeases, ContainerLoad, spec_digest
from celery_concurrent.spec import FunctionSpec

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


# -- held-message leases ------------------------------------------------------------------


def deliver(rds: redis.Redis, *tags: str, at: float = 1000.0) -> UnackedKeys:
    """Put ``tags`` in kombu's default unacked keys, as delivered at ``at`` (long ago)."""
    keys = UnackedKeys()
    for tag in tags:
        rds.hset(keys.payloads, tag, '[{}, "", "q"]')
        rds.zadd(keys.index, {tag: at})
    return keys


def test_renew_held_moves_only_still_unacked_tags_to_now(rds):
    keys = deliver(rds, "t1", "t2")
    held = HeldLeases(rds, keys)
    before = redis_now(rds)
    assert held.renew("h", ["t1", "t2", "acked"], ttl=LONG) == ["t1", "t2"]
    after = redis_now(rds)
    for tag in ("t1", "t2"):
        assert before <= rds.zscore(keys.index, tag) <= after
    # A tag acknowledged (or restored) meanwhile is not put back in the index.
    assert rds.zscore(keys.index, "acked") is None
    assert rds.smembers(held.held_key("h")) == {b"t1", b"t2"}


def test_renew_held_skips_a_tag_whose_payload_is_gone(rds):
    keys = deliver(rds, "t1", "t2")
    rds.hdel(keys.payloads, "t2")  # kombu's channel._restore drops the payload only
    held = HeldLeases(rds, keys)
    assert held.renew("h", ["t1", "t2"], ttl=LONG) == ["t1"]
    assert rds.zscore(keys.index, "t2") == 1000.0


def test_held_tags_recorded_are_exactly_those_of_the_last_renewal(rds):
    keys = deliver(rds, "t1", "t2")
    held = HeldLeases(rds, keys)
    assert held.renew("h", ["t1", "t2"], ttl=LONG) == ["t1", "t2"]
    assert held.renew("h", ["t2"], ttl=LONG) == ["t2"]
    assert rds.smembers(held.held_key("h")) == {b"t2"}


def test_holder_with_no_tags_left_is_no_holder(rds):
    keys = deliver(rds, "t1")
    held = HeldLeases(rds, keys)
    assert held.renew("h", ["t1"], ttl=SHORT) == ["t1"]
    assert held.renew("h", [], ttl=SHORT) == []
    time.sleep(SHORT * 2)
    assert held.expired_holders() == []
    assert held.claim_expired("h", "n") is None


def test_live_holder_is_neither_listed_nor_claimed(rds):
    held = HeldLeases(rds, deliver(rds, "t1"))
    assert held.renew("h", ["t1"], ttl=LONG) == ["t1"]
    assert held.expired_holders() == []
    assert held.claim_expired("h", "n") is None


def test_expired_holder_is_claimed_with_its_still_unacked_tags(rds):
    keys = deliver(rds, "t1", "t2")
    held = HeldLeases(rds, keys)
    assert held.renew("h", ["t1", "t2"], ttl=SHORT) == ["t1", "t2"]
    rds.hdel(keys.payloads, "t2")  # acknowledged just before the holder died
    wait_for(lambda: held.expired_holders() == ["h"], timeout=30, what="the holder to expire")
    assert held.claim_expired("h", "node-a") == ["t1"]
    assert held.expired_holders() == []
    assert rds.get(held.claimed_key("h")) == b"node-a"
    held.forget("h")
    assert not rds.exists(held.held_key("h"))
    assert rds.zscore(held.holders_key, "h") is None


def test_claimed_holder_is_refused_its_renewal(rds):
    held = HeldLeases(rds, deliver(rds, "t1"))
    assert held.renew("h", ["t1"], ttl=SHORT) == ["t1"]
    wait_for(held.expired_holders, timeout=30, what="the holder to expire")
    assert held.claim_expired("h", "node-a") == ["t1"]
    assert held.renew("h", ["t1"], ttl=LONG) is None
    # Another holder is unaffected.
    assert held.renew("h2", ["t1"], ttl=LONG) == ["t1"]


def test_expired_holder_that_renews_before_any_claim_keeps_its_tags(rds):
    held = HeldLeases(rds, deliver(rds, "t1"))
    assert held.renew("h", ["t1"], ttl=SHORT) == ["t1"]
    wait_for(held.expired_holders, timeout=30, what="the holder to expire")
    assert held.renew("h", ["t1"], ttl=LONG) == ["t1"]
    assert held.claim_expired("h", "node-a") is None


def test_lapsed_claim_passes_to_the_next_claimer_with_only_the_unrestored_tags(rds):
    keys = deliver(rds, "t1", "t2")
    held = HeldLeases(rds, keys)
    assert held.renew("h", ["t1", "t2"], ttl=SHORT) == ["t1", "t2"]
    wait_for(held.expired_holders, timeout=30, what="the holder to expire")
    assert sorted(held.claim_expired("h", "node-a", claim_ttl=SHORT)) == ["t1", "t2"]
    assert held.claim_expired("h", "node-b") is None
    # node-a restored t1, then died before forgetting the holder.
    rds.hdel(keys.payloads, "t1")
    wait_for(held.expired_holders, timeout=30, what="node-a's claim to lapse")
    assert held.claim_expired("h", "node-b") == ["t2"]


def test_racing_claimers_claim_each_expired_holder_exactly_once(broker_url):
    clients = [redis.Redis.from_url(broker_url) for _ in range(2)]
    holders = [f"h{i}" for i in range(30)]
    keys = deliver(clients[0], *(f"tag-{h}" for h in holders))
    sides = [HeldLeases(client, keys) for client in clients]
    for holder in holders:
        assert sides[0].renew(holder, [f"tag-{holder}"], ttl=SHORT) == [f"tag-{holder}"]
    wait_for(
        lambda: len(sides[0].expired_holders()) == len(holders),
        timeout=30,
        what="every holder to expire",
    )
    claims: list[tuple[str, str, list[str]]] = []
    start = threading.Barrier(2)

    def claimer(i: int) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            for holder in sides[i].expired_holders():
                tags = sides[i].claim_expired(holder, f"node-{i}")
                if tags is not None:
                    claims.append((holder, f"node-{i}", tags))

        return run

    run_threads([claimer(0), claimer(1)])
    assert sorted(holder for holder, _, _ in claims) == sorted(holders)
    assert all(tags == [f"tag-{holder}"] for holder, _, tags in claims)


def test_holder_name_is_the_container_node_and_pid():
    assert holder_name(node(1), 4242) == f"{node(1)}:4242"


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


def test_renewed_message_outlives_visibility_timeout_and_comes_back_once_its_holder_dies(
    broker_url, rds
):
    from celery import Celery

    from celery_concurrent.supervisor.redelivery import Redelivery

    queue = exchange_queue("cc-leases-e2e")
    options = {"visibility_timeout": VISIBILITY_TIMEOUT}
    with Connection(broker_url, transport_options=options) as conn:
        channel = conn.default_channel
        # The holder dies: its channel puts nothing back when it closes.
        channel.qos.restore_at_shutdown = False
        renewed, control = publish_and_fetch(conn, queue, {"n": "renewed"}, {"n": "control"})
        held = HeldLeases.for_channel(rds, channel)
        holder = holder_name("proj.fetch-1@host", 1)
        fetched = time.monotonic()

        # Renewed, it stays unacknowledged past visibility_timeout; the control does not.
        # A round counts only if restore_visible ran well within visibility_timeout of
        # the renewal (a loaded machine may stall between them); one must, well past it.
        checked = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            checked and time.monotonic() - fetched > VISIBILITY_TIMEOUT * 2
        ):
            assert held.renew(holder, [renewed.delivery_tag], ttl=1.0) == [renewed.delivery_tag]
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

        # It stops renewing: its lease expires, one node claims it and restores it.
        wait_for(
            lambda: held.expired_holders() == [holder], timeout=30, what="the holder to expire"
        )
        claims = [held.claim_expired(holder, "celery@a"), held.claim_expired(holder, "celery@b")]
        assert claims == [[renewed.delivery_tag], None]
        redelivery = Redelivery(Celery(broker=broker_url))
        try:
            assert redelivery.restore(claims[0]) == 1
            held.forget(holder)
            # Nothing puts it back a second time.
            assert redelivery.restore(claims[0]) == 0
        finally:
            redelivery.close()
        channel.qos.restore_visible(interval=1)
        assert held.expired_holders() == []
        assert drain(channel, queue) == [renewed.payload]


def test_held_leases_follow_kombus_global_keyprefix(broker_url, rds):
    from celery import Celery

    from celery_concurrent.supervisor.redelivery import Redelivery

    queue = exchange_queue("cc-leases-prefixed")
    options = {"global_keyprefix": "pfx:", "visibility_timeout": VISIBILITY_TIMEOUT}
    with Connection(broker_url, transport_options=options) as conn:
        channel = conn.default_channel
        channel.qos.restore_at_shutdown = False
        (message,) = publish_and_fetch(conn, queue, {"n": 1})
        held = HeldLeases.for_channel(rds, channel)
        assert held.unacked == UnackedKeys("pfx:unacked_index", "pfx:unacked")
        assert held.holders_key.startswith("pfx:celery-concurrent:")

        before = redis_now(rds)
        assert held.renew("h", [message.delivery_tag], ttl=SHORT) == [message.delivery_tag]
        assert rds.zscore("pfx:unacked_index", message.delivery_tag) >= before

        wait_for(lambda: held.expired_holders() == ["h"], timeout=30, what="the holder to expire")
        (tag,) = held.claim_expired("h", "celery@a") or []
        app = Celery(broker=broker_url)
        app.conf.broker_transport_options = options
        redelivery = Redelivery(app)
        try:
            # The supervisor's own redelivery path reads the prefixed keys too.
            assert redelivery.restore([tag]) == 1
        finally:
            redelivery.close()
        held.forget("h")
        assert rds.llen(f"pfx:{queue.name}") == 1
        assert drain(channel, queue) == [message.payload]
