"""The scaling policy: ``decide`` is a pure function from observations to a decision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_concurrent import FunctionSpec
from celery_concurrent.supervisor.policy import (
    ContainerState,
    Decision,
    FunctionLoad,
    Observation,
    crash_backoff,
    decide,
    device_capacity,
    node_share,
    upper_bound,
)


def spec(**options: Any) -> FunctionSpec:
    return FunctionSpec.from_options("proj.fetch", options)


def idle(ident: str, seconds: float = 0.0) -> ContainerState:
    return ContainerState(ident, in_flight=0, idle_for=seconds)


def busy(ident: str, in_flight: int = 1) -> ContainerState:
    return ContainerState(ident, in_flight=in_flight)


def starting(ident: str) -> ContainerState:
    return ContainerState(ident, starting=True)


def decide_for(
    fn: FunctionSpec,
    backlog: int = 0,
    containers: Sequence[ContainerState] = (),
    node_capacity: int | None = None,
) -> Decision:
    return decide(Observation(fn, backlog, tuple(containers), node_capacity))


def case(
    fn: FunctionSpec,
    backlog: int,
    containers: Sequence[ContainerState],
    expected: tuple[int, int, tuple[str, ...]],
    id: str,
    node_capacity: int | None = None,
) -> Any:
    """One row: the observation and the expected (desired, start, retire)."""
    return pytest.param(fn, backlog, containers, node_capacity, expected, id=id)


DESIGN = {
    "allow_concurrent_inputs": 20,
    "concurrency_limit": 5,
    "keep_warm": 1,
    "container_idle_timeout": 30,
}

CASES = [
    # Scale from zero.
    case(spec(), 0, [], (0, 0, ()), "no-traffic-no-containers-stays-at-zero"),
    case(spec(), 1, [], (1, 1, ()), "one-input-starts-one-container-from-zero"),
    case(spec(), 5, [], (5, 5, ()), "backlog-of-five-single-input-starts-five"),
    case(spec(max_inputs=10), 11, [], (2, 2, ()), "backlog-rounds-up-to-whole-containers"),
    # The DESIGN example.
    case(
        spec(allow_concurrent_inputs=20),
        100,
        [],
        (5, 5, ()),
        "design-20-inputs-each-100-enqueued-starts-5",
    ),
    case(
        spec(allow_concurrent_inputs=20),
        100,
        [idle("a"), idle("b")],
        (5, 3, ()),
        "design-100-enqueued-two-live-starts-3",
    ),
    case(
        spec(allow_concurrent_inputs=20, concurrency_limit=3),
        100,
        [],
        (3, 3, ()),
        "design-100-enqueued-capped-by-concurrency-limit",
    ),
    case(spec(**DESIGN), 0, [], (1, 1, ()), "design-keep-warm-1-starts-one-with-no-traffic"),
    case(spec(**DESIGN), 1000, [], (5, 5, ()), "design-flood-capped-at-concurrency-limit"),
    case(
        spec(**DESIGN),
        0,
        [idle("a", 31), idle("b", 40), idle("c", 50), idle("d", 60), idle("e", 70)],
        (1, 0, ("e", "d", "c", "b")),
        "design-burst-over-idles-back-to-keep-warm-most-idle-first",
    ),
    case(
        spec(**DESIGN),
        0,
        [idle("a", 29), idle("b", 29)],
        (1, 0, ()),
        "design-idle-under-timeout-kept",
    ),
    # Immediate scale-up.
    case(
        spec(max_inputs=20),
        1,
        [busy("a", 20), busy("b", 20)],
        (3, 1, ()),
        "demand-one-over-capacity-starts-one-at-once",
    ),
    case(
        spec(max_inputs=20),
        0,
        [busy("a", 20), busy("b", 20)],
        (2, 0, ()),
        "demand-equal-to-capacity-starts-none",
    ),
    case(
        spec(max_inputs=20),
        15,
        [idle("a")],
        (1, 0, ()),
        "backlog-within-idle-capacity-starts-none",
    ),
    case(
        spec(max_inputs=2),
        0,
        [busy("a", 2), busy("b", 2), busy("c", 1)],
        (3, 0, ()),
        "in-flight-inputs-count-as-demand",
    ),
    # The upper bound: max_containers and the node's capacity.
    case(spec(max_containers=3), 100, [], (3, 3, ()), "never-above-max-containers"),
    case(spec(concurrency_limit=2), 100, [], (2, 2, ()), "never-above-concurrency-limit"),
    case(
        spec(max_containers=3),
        100,
        [busy("a"), busy("b"), busy("c")],
        (3, 0, ()),
        "at-max-containers-starts-none",
    ),
    case(spec(), 100, [], (4, 4, ()), "node-capacity-bounds-unlimited-function", node_capacity=4),
    case(
        spec(max_containers=10),
        100,
        [],
        (3, 3, ()),
        "node-capacity-below-max-containers-wins",
        node_capacity=3,
    ),
    case(
        spec(max_containers=2),
        100,
        [],
        (2, 2, ()),
        "max-containers-below-node-capacity-wins",
        node_capacity=8,
    ),
    case(spec(), 100, [], (0, 0, ()), "full-node-starts-none", node_capacity=0),
    case(
        spec(keep_warm=3), 0, [], (2, 2, ()), "node-capacity-below-keep-warm-wins", node_capacity=2
    ),
    # keep_warm / min_containers.
    case(spec(keep_warm=2), 0, [], (2, 2, ()), "keep-warm-starts-containers-with-no-traffic"),
    case(spec(min_containers=1), 0, [], (1, 1, ()), "min-containers-starts-with-no-traffic"),
    case(
        spec(keep_warm=2),
        0,
        [idle("a", 3600), idle("b", 3600)],
        (2, 0, ()),
        "keep-warm-containers-never-idle-out",
    ),
    case(
        spec(keep_warm=2),
        0,
        [idle("a", 3600), idle("b", 7200), idle("c", 100)],
        (2, 0, ("b",)),
        "idle-surplus-above-keep-warm-retires-most-idle",
    ),
    case(
        spec(keep_warm=2, max_inputs=10),
        15,
        [idle("a"), idle("b")],
        (2, 0, ()),
        "warm-containers-absorb-backlog",
    ),
    # buffer_containers.
    case(spec(buffer_containers=2), 0, [], (0, 0, ()), "buffer-not-kept-without-traffic"),
    case(spec(buffer_containers=2), 1, [], (3, 3, ()), "buffer-added-while-busy"),
    case(
        spec(max_inputs=10, buffer_containers=1),
        0,
        [busy("a", 10)],
        (2, 1, ()),
        "buffer-added-for-in-flight-inputs",
    ),
    case(
        spec(buffer_containers=2, max_containers=2),
        1,
        [],
        (2, 2, ()),
        "buffer-clamped-by-max-containers",
    ),
    case(
        spec(buffer_containers=2, keep_warm=1),
        0,
        [],
        (1, 1, ()),
        "buffer-not-added-to-keep-warm-without-traffic",
    ),
    case(
        spec(buffer_containers=2),
        0,
        [idle("a", 100), idle("b", 200), idle("c", 300)],
        (0, 0, ("c", "b", "a")),
        "buffer-containers-retire-after-traffic-stops",
    ),
    # target_inputs below max_inputs.
    case(
        spec(max_inputs=10, target_inputs=5),
        20,
        [],
        (4, 4, ()),
        "target-below-max-means-more-containers",
    ),
    case(spec(max_inputs=10), 20, [], (2, 2, ()), "target-equal-to-max-fills-each-container"),
    case(
        spec(max_inputs=10, target_inputs=5),
        0,
        [busy("a", 6)],
        (2, 1, ()),
        "container-above-target-but-below-max-starts-another",
    ),
    # Scale-down only after scaledown_window.
    case(
        spec(scaledown_window=60),
        0,
        [idle("a", 59.9)],
        (0, 0, ()),
        "idle-just-under-window-is-kept",
    ),
    case(spec(scaledown_window=60), 0, [idle("a", 60)], (0, 0, ("a",)), "idle-for-window-retires"),
    case(
        spec(container_idle_timeout=5),
        0,
        [idle("a", 5.5)],
        (0, 0, ("a",)),
        "container-idle-timeout-is-the-window",
    ),
    case(
        spec(),
        0,
        [idle("a", 59), idle("b", 61)],
        (0, 0, ("b",)),
        "default-window-is-60-seconds",
    ),
    case(
        spec(keep_warm=1),
        0,
        [idle("a", 70), idle("b", 300), idle("c", 100)],
        (1, 0, ("b", "c")),
        "most-idle-retired-first",
    ),
    case(
        spec(),
        0,
        [idle("b", 100), idle("a", 100)],
        (0, 0, ("a", "b")),
        "equally-idle-retired-in-ident-order",
    ),
    # Busy containers are never retired for idleness.
    case(
        spec(max_inputs=10),
        0,
        [idle("a", 120), busy("b"), idle("c", 120)],
        (1, 0, ("a", "c")),
        "busy-container-kept-while-idle-ones-retire",
    ),
    case(
        spec(max_inputs=20),
        0,
        [busy("a"), busy("b")],
        (1, 0, ()),
        "lightly-loaded-busy-containers-not-consolidated",
    ),
    case(
        spec(max_inputs=10),
        0,
        [
            ContainerState("a", in_flight=1, idle_for=999),
            ContainerState("b", in_flight=1, idle_for=999),
        ],
        (1, 0, ()),
        "busy-container-with-stale-idle-time-kept",
    ),
    # Starting containers count as capacity and are not retired.
    case(
        spec(max_inputs=5),
        5,
        [starting("s")],
        (1, 0, ()),
        "starting-container-counts-as-capacity",
    ),
    case(
        spec(),
        5,
        [starting("s"), starting("t")],
        (5, 3, ()),
        "backlog-beyond-starting-capacity-starts-the-rest",
    ),
    case(spec(), 0, [starting("s")], (0, 0, ()), "starting-container-not-retired-without-traffic"),
    case(
        spec(),
        0,
        [ContainerState("s", idle_for=600, starting=True)],
        (0, 0, ()),
        "slow-starting-container-not-retired",
    ),
    case(
        spec(),
        0,
        [starting("s"), idle("a", 100)],
        (0, 0, ("a",)),
        "idle-started-container-retires-starting-one-kept",
    ),
    # A bound lowered at runtime: the surplus drains at once, least busy first.
    case(
        spec(max_inputs=10, max_containers=1),
        0,
        [busy("a", 5), busy("b", 1), busy("c", 3)],
        (1, 0, ("b", "c")),
        "lowered-max-drains-surplus-at-once-least-busy-first",
    ),
    case(
        spec(max_inputs=20, max_containers=2),
        0,
        [busy("a", 3), idle("b", 10), busy("c", 1), idle("d", 5)],
        (1, 0, ("b", "d")),
        "lowered-max-drains-idle-before-busy-most-idle-first",
    ),
    case(
        spec(max_containers=1),
        0,
        [idle("a", 1), idle("b", 2)],
        (0, 0, ("b",)),
        "lowered-max-drains-within-scaledown-window",
    ),
    case(
        spec(max_containers=2),
        0,
        [idle("a", 100), idle("b", 200), idle("c", 300), idle("d", 10)],
        (0, 0, ("c", "b", "a")),
        "lowered-max-drains-surplus-then-idle-containers",
    ),
    case(
        spec(),
        2,
        [busy("a"), busy("b"), idle("c", 3)],
        (2, 0, ("c",)),
        "lowered-node-capacity-drains-surplus",
        node_capacity=2,
    ),
    case(
        spec(max_containers=1),
        0,
        [starting("s"), idle("a", 5)],
        (0, 0, ("a",)),
        "lowered-max-drains-started-containers-not-starting-ones",
    ),
    case(
        spec(max_containers=1),
        0,
        [starting("s"), starting("t")],
        (0, 0, ()),
        "lowered-max-waits-for-starting-containers",
    ),
]


@pytest.mark.parametrize(("fn", "backlog", "containers", "node_capacity", "expected"), CASES)
def test_decision(
    fn: FunctionSpec,
    backlog: int,
    containers: list[ContainerState],
    node_capacity: int | None,
    expected: tuple[int, int, tuple[str, ...]],
) -> None:
    decision = decide_for(fn, backlog, containers, node_capacity)
    assert (decision.desired, decision.start, decision.retire) == expected
    assert decision.changes == bool(expected[1] or expected[2])


def test_decision_reason_names_backlog_in_flight_and_capacity() -> None:
    decision = decide_for(spec(max_inputs=20), 100, [busy("a", 7), idle("b")])
    assert decision.reason == "backlog 100, in flight 7, capacity 40"


@pytest.mark.parametrize(
    ("fn", "backlog", "containers", "node_capacity", "why"),
    [
        (spec(max_inputs=4, keep_warm=2), 0, [], None, "capacity 0; min_containers 2"),
        (spec(max_inputs=10, max_containers=3), 100, [idle("a")], None, "; max_containers 3"),
        (spec(max_inputs=10), 100, [], 2, "capacity 0; node capacity 2"),
        (spec(max_inputs=10, buffer_containers=1), 5, [], None, "; buffer_containers 1"),
        (
            spec(max_inputs=4, scaledown_window=30),
            0,
            [idle("a", 31), idle("b", 31)],
            None,
            "capacity 8; idle for scaledown_window 30s",
        ),
        (
            spec(max_inputs=4, max_containers=1),
            0,
            [busy("a", 2), busy("b", 1)],
            None,
            "in flight 3, capacity 8; above max_containers 1",
        ),
    ],
)
def test_decision_reason_names_what_bound_a_change(
    fn: FunctionSpec,
    backlog: int,
    containers: list[ContainerState],
    node_capacity: int | None,
    why: str,
) -> None:
    decision = decide_for(fn, backlog, containers, node_capacity)
    assert decision.changes
    assert decision.reason.endswith(why), decision.reason


def test_same_observation_gives_the_same_decision() -> None:
    obs = Observation(spec(max_inputs=4, keep_warm=1), 9, (busy("a", 4), idle("b", 90)))
    assert decide(obs) == decide(obs)


# --- Properties over random specs and observations ---------------------------------------


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    max_inputs = draw(st.integers(1, 50))
    max_containers = draw(st.none() | st.integers(1, 20))
    fn = spec(
        max_inputs=max_inputs,
        target_inputs=draw(st.integers(1, max_inputs)),
        max_containers=max_containers,
        min_containers=draw(st.integers(0, 20 if max_containers is None else max_containers)),
        buffer_containers=draw(st.integers(0, 5)),
        scaledown_window=draw(st.floats(0.5, 600)),
    )
    window = fn.scaledown_window
    idle_times = st.floats(0, 1200) | st.sampled_from([0.0, window, window * 0.999])
    count = draw(st.integers(0, 25))
    containers = tuple(
        ContainerState(
            ident=f"c{i:02d}",
            in_flight=draw(st.integers(0, max_inputs) | st.just(0)),
            idle_for=draw(idle_times),
            starting=draw(st.sampled_from([False, False, False, True])),
        )
        for i in range(count)
    )
    return Observation(
        spec=fn,
        backlog=draw(st.integers(0, 1000) | st.just(0)),
        containers=containers,
        node_capacity=draw(st.none() | st.integers(0, 30)),
    )


def _outcome(obs: Observation) -> tuple[Decision, int, int | None, dict[str, ContainerState]]:
    decision = decide(obs)
    final = len(obs.containers) - len(decision.retire) + decision.start
    return (
        decision,
        final,
        upper_bound(obs.spec, obs.node_capacity),
        {c.ident: c for c in obs.containers},
    )


PROPERTY = settings(max_examples=300, deadline=None)


@PROPERTY
@given(observations())
def test_live_count_after_decision_stays_within_bounds(obs: Observation) -> None:
    decision, final, upper, _ = _outcome(obs)
    starting_count = sum(c.starting for c in obs.containers)
    floor = obs.spec.min_containers if upper is None else min(obs.spec.min_containers, upper)
    assert final >= floor
    if upper is not None:
        # Only containers still starting can keep the count above the bound, for now.
        assert final <= max(upper, starting_count)


@PROPERTY
@given(observations())
def test_starts_only_up_to_desired_when_below_it(obs: Observation) -> None:
    decision, final, _, _ = _outcome(obs)
    live = len(obs.containers)
    assert decision.start >= 0
    if decision.start:
        assert decision.desired > live
        assert final == decision.desired


@PROPERTY
@given(observations())
def test_never_both_starts_and_retires(obs: Observation) -> None:
    decision = decide(obs)
    assert not (decision.start and decision.retire)


@PROPERTY
@given(observations())
def test_retires_only_known_containers_once_and_never_below_desired(obs: Observation) -> None:
    decision, final, _, by_ident = _outcome(obs)
    assert len(set(decision.retire)) == len(decision.retire)
    assert set(decision.retire) <= set(by_ident)
    if decision.retire:
        assert len(obs.containers) > decision.desired
    assert final >= decision.desired


@PROPERTY
@given(observations())
def test_busy_container_is_retired_only_above_the_upper_bound(obs: Observation) -> None:
    decision, _, upper, by_ident = _outcome(obs)
    if any(by_ident[ident].in_flight > 0 for ident in decision.retire):
        assert upper is not None
        assert len(obs.containers) > upper


@PROPERTY
@given(observations())
def test_container_idle_under_window_is_retired_only_above_the_upper_bound(
    obs: Observation,
) -> None:
    decision, _, upper, by_ident = _outcome(obs)
    window = obs.spec.scaledown_window
    if any(by_ident[ident].idle_for < window for ident in decision.retire):
        assert upper is not None
        assert len(obs.containers) > upper


@PROPERTY
@given(observations())
def test_starting_container_is_never_retired(obs: Observation) -> None:
    decision, _, _, by_ident = _outcome(obs)
    assert not any(by_ident[ident].starting for ident in decision.retire)


@PROPERTY
@given(observations())
def test_demand_over_capacity_below_the_bound_starts_a_container(obs: Observation) -> None:
    decision, _, upper, _ = _outcome(obs)
    live = len(obs.containers)
    demand = obs.backlog + obs.in_flight
    if demand > live * obs.spec.target_inputs and (upper is None or live < upper):
        assert decision.start >= 1


# -- what the decision holds back --------------------------------------------------------


def test_an_unreadable_backlog_decides_nothing_and_keeps_what_runs() -> None:
    decision = decide(Observation(spec(keep_warm=2), None, (idle("a", 3600),)))
    assert decision.held and not decision.changes
    assert decision.reason == "broker unreachable: keeping what runs"


def test_a_function_the_node_cannot_place_gets_no_decision() -> None:
    decision = decide(Observation(spec(gpu="H100"), 50, (), node_capacity=0, placeable=False))
    assert decision.held and decision.start == 0


def test_backing_off_after_a_crash_starts_nothing_but_still_names_the_demand() -> None:
    decision = decide(Observation(spec(), 3, (), backing_off=True))
    assert decision.start == 0 and decision.desired == 3
    assert decision.reason.endswith("backing off after a crash")


def test_backing_off_still_retires_idle_containers() -> None:
    obs = Observation(spec(scaledown_window=1), 0, (idle("a", 5),), backing_off=True)
    assert decide(obs).retire == ("a",)


def test_the_reason_names_each_cause_of_a_retirement_once() -> None:
    containers = (busy("a"), idle("b", 100), idle("c", 100))
    decision = decide_for(spec(max_containers=2, scaledown_window=10), 0, containers)
    # c is over max_containers (least busy first), then b idle; a keeps its input.
    assert decision.retire == ("b", "c")
    assert decision.reason.count("above max_containers 2") == 1
    assert decision.reason.count("idle for scaledown_window 10s") == 1


# -- the node's fair share ----------------------------------------------------------------


def loads(**by_name: tuple[int, int] | tuple[int, int, bool]) -> dict[str, FunctionLoad]:
    """``name=(live, backlog[, placeable])`` for each function on the node."""
    return {name: FunctionLoad(*values) for name, values in by_name.items()}


SHARES = [
    # (bound, asking, loads, expected share)
    pytest.param(8, "a", loads(a=(0, 0)), 8, id="alone-gets-the-whole-node"),
    pytest.param(8, "a", loads(a=(0, 100), b=(0, 0)), 8, id="idle-neighbour-takes-nothing"),
    pytest.param(8, "a", loads(a=(2, 100), b=(3, 0)), 5, id="free-room-beside-live-neighbour"),
    pytest.param(8, "a", loads(a=(0, 100), b=(8, 50)), 4, id="flood-never-starves-fair-share-half"),
    pytest.param(
        9, "a", loads(a=(0, 1), b=(6, 9), c=(3, 9)), 3, id="three-busy-share-a-third-each"
    ),
    pytest.param(2, "a", loads(a=(0, 1), b=(1, 9), c=(1, 9)), 1, id="never-below-one-container"),
    pytest.param(8, "a", loads(a=(0, 5), b=(0, 0), c=(0, 0)), 8, id="quiet-functions-are-not-busy"),
    pytest.param(
        8, "a", loads(a=(0, 5), gpu=(0, 50, False)), 8, id="unplaceable-backlog-is-not-busy-here"
    ),
    pytest.param(8, "a", loads(a=(0, 5), gpu=(2, 50, False)), 6, id="live-unplaceable-holds-room"),
    pytest.param(8, "b", loads(a=(0, 100), b=(8, 50)), 8, id="the-flooder-keeps-what-is-free"),
    pytest.param(4, "a", loads(a=(6, 9)), 4, id="a-lowered-bound-is-the-share"),
]


@pytest.mark.parametrize(("bound", "asking", "by_name", "expected"), SHARES)
def test_node_share(
    bound: int, asking: str, by_name: dict[str, FunctionLoad], expected: int
) -> None:
    assert node_share(bound, asking, by_name) == expected


@pytest.mark.parametrize(
    ("share", "live", "free_slots", "expected"),
    [
        pytest.param(8, 0, None, 8, id="cpu-function-is-not-clamped"),
        pytest.param(8, 0, 2, 2, id="two-free-devices-two-containers"),
        pytest.param(8, 2, 0, 2, id="running-containers-keep-their-devices"),
        pytest.param(1, 0, 4, 1, id="the-node-share-still-bounds-it"),
        pytest.param(8, 0, 0, 0, id="no-free-device-no-new-container"),
    ],
)
def test_device_capacity(share: int, live: int, free_slots: int | None, expected: int) -> None:
    assert device_capacity(share, live, free_slots) == expected


def test_a_flooded_node_drains_the_flooder_down_to_its_fair_share() -> None:
    by_name = loads(a=(0, 100), b=(8, 50))
    a_obs = Observation(spec(), 100, (), node_capacity=node_share(8, "a", by_name))
    b_containers = tuple(busy(str(i)) for i in range(8))
    b_share = node_share(8, "b", {**by_name, "a": FunctionLoad(4, 100)})
    b_obs = Observation(spec(), 50, b_containers, node_capacity=b_share)
    assert decide(a_obs).start == 4
    assert len(decide(b_obs).retire) == 4


@pytest.mark.parametrize(
    ("streak", "delay"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)]
)
def test_crash_backoff_doubles_up_to_a_minute(streak: int, delay: float) -> None:
    assert crash_backoff(streak) == delay


# -- cluster scope: the bounds over every node, the choice over every container ---------


def remote(ident: str, in_flight: int = 0, idle_for: float = 0.0) -> ContainerState:
    return ContainerState(f"proj.fetch-{ident}@other", in_flight=in_flight, idle_for=idle_for)


CLUSTER_CASES = [
    pytest.param(
        spec(keep_warm=1),
        0,
        [],
        [remote("1", idle_for=999)],
        None,
        (0, 0, ()),
        id="keep-warm-held-by-another-node-starts-nothing-here",
    ),
    pytest.param(
        spec(keep_warm=1),
        0,
        [],
        [],
        None,
        (1, 1, ()),
        id="keep-warm-held-by-no-node-starts-one-here",
    ),
    pytest.param(
        spec(concurrency_limit=3),
        100,
        [],
        [remote("1", 1), remote("2", 1)],
        None,
        (1, 1, ()),
        id="limit-three-with-two-elsewhere-starts-one",
    ),
    pytest.param(
        spec(concurrency_limit=3),
        100,
        [busy("1")],
        [remote("1", 1), remote("2", 1)],
        None,
        (1, 0, ()),
        id="limit-reached-over-the-cluster-starts-nothing",
    ),
    pytest.param(
        spec(concurrency_limit=10),
        100,
        [],
        [remote(str(i), 1) for i in range(4)],
        3,
        (3, 3, ()),
        id="node-capacity-still-bounds-this-nodes-share",
    ),
    pytest.param(
        spec(keep_warm=1, scaledown_window=10),
        0,
        [idle("1", 50)],
        [remote("1", idle_for=90)],
        None,
        (0, 0, ()),
        id="the-idlest-container-is-elsewhere-so-this-node-keeps-its-own",
    ),
    pytest.param(
        spec(keep_warm=1, scaledown_window=10),
        0,
        [idle("1", 90)],
        [remote("1", idle_for=50)],
        None,
        (0, 0, ("1",)),
        id="this-nodes-container-is-the-idlest-so-it-retires",
    ),
    pytest.param(
        spec(keep_warm=2, scaledown_window=10),
        0,
        [idle("1", 90)],
        [remote("1", idle_for=50)],
        None,
        (1, 0, ()),
        id="keep-warm-counts-every-node-so-nothing-retires",
    ),
    pytest.param(
        spec(concurrency_limit=2),
        10,
        [busy("1", 5)],
        [remote("1", 1), remote("2", 1)],
        None,
        (0, 0, ()),
        id="above-a-lowered-limit-the-least-busy-go-which-are-elsewhere",
    ),
    pytest.param(
        spec(concurrency_limit=2),
        10,
        [busy("1", 1)],
        [remote("1", 3), remote("2", 5)],
        None,
        (0, 0, ("1",)),
        id="above-a-lowered-limit-this-nodes-least-busy-container-goes",
    ),
    pytest.param(
        spec(max_inputs=10),
        0,
        [busy("1", 10)],
        [remote("1", 10)],
        None,
        (1, 0, ()),
        id="in-flight-elsewhere-counts-in-the-demand",
    ),
    pytest.param(
        spec(max_inputs=10),
        5,
        [busy("1", 10)],
        [remote("1", 10)],
        None,
        (2, 1, ()),
        id="backlog-beyond-every-nodes-capacity-starts-one-more",
    ),
]


@pytest.mark.parametrize(
    ("fn", "backlog", "containers", "elsewhere", "node_capacity", "expected"), CLUSTER_CASES
)
def test_cluster_decision(
    fn: FunctionSpec,
    backlog: int,
    containers: Sequence[ContainerState],
    elsewhere: Sequence[ContainerState],
    node_capacity: int | None,
    expected: tuple[int, int, tuple[str, ...]],
) -> None:
    obs = Observation(fn, backlog, tuple(containers), node_capacity, elsewhere=tuple(elsewhere))
    decision = decide(obs)
    assert (decision.desired, decision.start, decision.retire) == expected


def test_cluster_desired_is_the_number_over_every_node() -> None:
    obs = Observation(
        spec(concurrency_limit=3), 100, (), None, elsewhere=(remote("1", 1), remote("2", 1))
    )
    decision = decide(obs)
    assert decision.cluster_desired == 3
    assert decision.desired == 1
    assert "max_containers 3" in decision.reason


@st.composite
def cluster_observations(draw: st.DrawFn) -> Observation:
    """An observation of this node's containers with others' split off as ``elsewhere``."""
    obs = draw(observations())
    split = draw(st.integers(0, len(obs.containers)))
    elsewhere = tuple(
        ContainerState(f"{c.ident}@other", c.in_flight, c.idle_for, c.starting)
        for c in obs.containers[split:]
    )
    return Observation(
        obs.spec, obs.backlog, obs.containers[:split], obs.node_capacity, elsewhere=elsewhere
    )


@PROPERTY
@given(cluster_observations())
def test_cluster_starts_never_exceed_the_limit_and_retire_only_this_nodes(
    obs: Observation,
) -> None:
    decision = decide(obs)
    total = len(obs.everywhere)
    mine = {c.ident for c in obs.containers}
    assert set(decision.retire) <= mine
    if decision.start:
        limit = obs.spec.max_containers
        assert limit is None or total + decision.start <= limit
        assert total + decision.start <= (decision.cluster_desired or 0)
        if obs.node_capacity is not None:
            assert len(obs.containers) + decision.start <= obs.node_capacity
    idle_only = all(ident not in _forced_set(obs) for ident in decision.retire)
    if idle_only and decision.retire:
        assert total - len(decision.retire) >= obs.spec.min_containers


def _forced_set(obs: Observation) -> set[str]:
    over = 0 if obs.spec.max_containers is None else len(obs.everywhere) - obs.spec.max_containers
    over_node = 0 if obs.node_capacity is None else len(obs.containers) - obs.node_capacity
    return {c.ident for c in obs.containers} if max(over, over_node) > 0 else set()


@pytest.mark.parametrize(
    ("peers", "elsewhere", "expected"),
    [(1, 0, 3), (2, 0, 2), (3, 0, 1), (4, 0, 1), (3, 2, 1), (2, 3, 0)],
    ids=["alone", "two", "three", "more-peers-than-need", "two-started-elsewhere", "limit-met"],
)
def test_each_node_starts_its_share_of_a_scale_up(peers: int, elsewhere: int, expected: int):
    obs = Observation(
        spec(concurrency_limit=3),
        100,
        (),
        None,
        elsewhere=tuple(remote(str(i), 1) for i in range(elsewhere)),
        peers=peers,
    )
    assert decide(obs).start == expected


def test_a_batched_function_counts_its_capacity_in_items():
    from celery_concurrent.batching import BatchSettings

    batched = FunctionSpec.from_options(
        "proj.embed", {"max_inputs": 2}, batch=BatchSettings(max_batch_size=32, wait_ms=20)
    )
    # 2 batches of 32 per container: 100 items need 2 containers, not 50.
    decision = decide(Observation(batched, 100, ()))
    assert (decision.desired, decision.start) == (2, 2)
    assert "capacity 0" in decision.reason
    busy_one = decide(Observation(batched, 0, (busy("1", 64),)))
    assert busy_one.desired == 1 and "capacity 64" in busy_one.reason
