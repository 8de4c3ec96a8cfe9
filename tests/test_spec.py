"""FunctionSpec, normalize_options and the validation ``@concurrent`` does when applied."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_concurrent import ConfigurationError, FunctionSpec, GpuRequest, concurrent, spec_of
from celery_concurrent.spec import ALIASES, normalize_options

SEED_TO_CURRENT = sorted(ALIASES.items())

DEFAULTS = {
    "max_inputs": 1,
    "target_inputs": 1,
    "max_containers": None,
    "min_containers": 0,
    "buffer_containers": 0,
    "scaledown_window": 60.0,
    "gpu": None,
    "pool": "threads",
}


@pytest.fixture(params=["pending", "finalized"])
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    """A fresh app, before (``@app.task`` returns a proxy) or after it is finalized."""
    app = Celery("t", broker="memory://", set_as_current=False)
    if request.param == "finalized":
        app.finalize()
    yield app


def assert_names(error: ConfigurationError, parameter: str, value: Any) -> None:
    """The error is a ConfigurationError (so a ValueError) naming the parameter and value."""
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, ValueError)
    assert parameter in str(error)
    assert repr(value) in str(error)


# --- Both spellings and the defaults ----------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(
            {"allow_concurrent_inputs": 7},
            {"max_inputs": 7, "target_inputs": 7},
            id="allow_concurrent_inputs-is-max_inputs",
        ),
        pytest.param({"max_inputs": 7}, {"max_inputs": 7, "target_inputs": 7}, id="max_inputs"),
        pytest.param(
            {"max_inputs": 8, "target_inputs": 3},
            {"max_inputs": 8, "target_inputs": 3},
            id="target_inputs",
        ),
        pytest.param(
            {"allow_concurrent_inputs": 8, "target_inputs": 8},
            {"max_inputs": 8, "target_inputs": 8},
            id="target_inputs-equal-to-allow_concurrent_inputs",
        ),
        pytest.param(
            {"concurrency_limit": 4},
            {"max_containers": 4},
            id="concurrency_limit-is-max_containers",
        ),
        pytest.param({"max_containers": 4}, {"max_containers": 4}, id="max_containers"),
        pytest.param(
            {"max_containers": None}, {"max_containers": None}, id="max_containers-None-unbounded"
        ),
        pytest.param({"keep_warm": 2}, {"min_containers": 2}, id="keep_warm-is-min_containers"),
        pytest.param({"min_containers": 2}, {"min_containers": 2}, id="min_containers"),
        pytest.param(
            {"concurrency_limit": 3, "keep_warm": 3},
            {"max_containers": 3, "min_containers": 3},
            id="keep_warm-equal-to-concurrency_limit",
        ),
        pytest.param({"buffer_containers": 3}, {"buffer_containers": 3}, id="buffer_containers"),
        pytest.param(
            {"container_idle_timeout": 30},
            {"scaledown_window": 30.0},
            id="container_idle_timeout-is-scaledown_window",
        ),
        pytest.param({"scaledown_window": 2.5}, {"scaledown_window": 2.5}, id="scaledown_window"),
        pytest.param({"pool": "gevent"}, {"pool": "gevent"}, id="gevent-pool-for-sync"),
        pytest.param({"pool": "threads"}, {"pool": "threads"}, id="threads-pool-for-sync"),
        pytest.param({"queue": "fetchers"}, {"queue": "fetchers"}, id="queue"),
    ],
)
def test_each_setting_normalises_to_its_current_name(
    options: dict[str, Any], expected: dict[str, Any]
) -> None:
    settings = normalize_options(options)
    assert settings == {**DEFAULTS, **expected}
    assert not set(settings) & set(ALIASES)


def test_defaults_match_the_design_table() -> None:
    assert normalize_options({}) == DEFAULTS


def test_target_inputs_defaults_to_max_inputs() -> None:
    assert normalize_options({"allow_concurrent_inputs": 20})["target_inputs"] == 20


def test_async_functions_default_to_the_asyncio_pool() -> None:
    assert normalize_options({}, is_async=True)["pool"] == "asyncio"
    assert normalize_options({"pool": "asyncio"}, is_async=True)["pool"] == "asyncio"


def test_spec_from_seed_and_current_spellings_is_the_same() -> None:
    seed = FunctionSpec.from_options(
        "proj.fetch",
        {
            "allow_concurrent_inputs": 20,
            "concurrency_limit": 5,
            "keep_warm": 1,
            "container_idle_timeout": 30,
        },
    )
    current = FunctionSpec.from_options(
        "proj.fetch",
        {"max_inputs": 20, "max_containers": 5, "min_containers": 1, "scaledown_window": 30},
    )
    assert seed == current
    assert seed == FunctionSpec(
        name="proj.fetch",
        queue="concurrent.proj.fetch",
        max_inputs=20,
        target_inputs=20,
        max_containers=5,
        min_containers=1,
        scaledown_window=30.0,
    )


def test_function_spec_is_frozen() -> None:
    spec = FunctionSpec.from_options("proj.fetch", {"max_inputs": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_inputs = 3  # type: ignore[misc]


# --- Every invalid configuration ---------------------------------------------------------

POSITIVE_COUNTS = [
    "allow_concurrent_inputs",
    "max_inputs",
    "target_inputs",
    "concurrency_limit",
    "max_containers",
]
ZERO_OR_MORE_COUNTS = ["keep_warm", "min_containers", "buffer_containers"]
NOT_WHOLE_NUMBERS = [2.5, 2.0, "2", True]
TIMEOUTS = ["container_idle_timeout", "scaledown_window"]


def _case(options: dict[str, Any], parameter: str, value: Any, id: str) -> Any:
    return pytest.param(options, parameter, value, id=id)


INVALID = [
    *(
        _case({name: value}, name, value, f"{name}={value!r}")
        for name in POSITIVE_COUNTS
        for value in (0, -1, *NOT_WHOLE_NUMBERS)
    ),
    *(
        _case({name: value}, name, value, f"{name}={value!r}")
        for name in ZERO_OR_MORE_COUNTS
        for value in (-1, *NOT_WHOLE_NUMBERS)
    ),
    *(
        _case({name: value}, name, value, f"{name}={value!r}")
        for name in TIMEOUTS
        for value in (0, -1, -0.5, math.inf, -math.inf, math.nan, "30", True)
    ),
    *(
        _case({seed: 4, current: 5}, seed, 4, f"both-{seed}-and-{current}")
        for seed, current in SEED_TO_CURRENT
    ),
    _case({"max_inputs": 4, "target_inputs": 5}, "target_inputs", 5, "target_inputs>max_inputs"),
    _case(
        {"allow_concurrent_inputs": 4, "target_inputs": 5},
        "target_inputs",
        5,
        "target_inputs>allow_concurrent_inputs",
    ),
    _case({"target_inputs": 2}, "target_inputs", 2, "target_inputs>default-max_inputs"),
    _case({"concurrency_limit": 3, "keep_warm": 4}, "keep_warm", 4, "keep_warm>concurrency_limit"),
    _case(
        {"max_containers": 3, "min_containers": 4},
        "min_containers",
        4,
        "min_containers>max_containers",
    ),
    _case({"pool": "prefork"}, "pool", "prefork", "unknown-pool-prefork"),
    _case({"pool": "eventlet"}, "pool", "eventlet", "unknown-pool-eventlet"),
    _case({"pool": "asyncio"}, "pool", "asyncio", "asyncio-pool-for-sync-function"),
    _case({"max_input": 3}, "max_input", 3, "unknown-keyword-max_input"),
    _case({"concurrency": 2}, "concurrency", 2, "unknown-keyword-concurrency"),
    _case({"queue": ""}, "queue", "", "empty-queue"),
    _case({"queue": "   "}, "queue", "   ", "blank-queue"),
    _case({"queue": 5}, "queue", 5, "queue-not-a-string"),
]

INVALID_FOR_ASYNC = [
    _case({"pool": "gevent"}, "pool", "gevent", "gevent-pool-for-async-function"),
    _case({"pool": "threads"}, "pool", "threads", "threads-pool-for-async-function"),
]


@pytest.mark.parametrize(("options", "parameter", "value"), INVALID)
def test_invalid_setting_is_rejected_naming_parameter_and_value(
    options: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_options(options)
    assert_names(caught.value, parameter, value)
    assert caught.value.parameter == parameter


@pytest.mark.parametrize(("options", "parameter", "value"), INVALID_FOR_ASYNC)
def test_sync_pool_for_async_function_is_rejected(
    options: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_options(options, is_async=True)
    assert_names(caught.value, parameter, value)


@pytest.mark.parametrize(("seed", "current"), SEED_TO_CURRENT)
def test_both_names_of_one_setting_are_rejected_naming_both(seed: str, current: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_options({seed: 4, current: 5})
    assert f"{seed}=4" in str(caught.value)
    assert f"{current}=5" in str(caught.value)


def test_keep_warm_above_concurrency_limit_names_the_limit() -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_options({"concurrency_limit": 3, "keep_warm": 4})
    assert "concurrency_limit=3" in str(caught.value)


@pytest.mark.parametrize("name", ZERO_OR_MORE_COUNTS)
def test_zero_is_a_valid_floor_count(name: str) -> None:
    assert normalize_options({name: 0})[ALIASES.get(name, name)] == 0


# --- Errors happen when the decorator is applied, in either order ------------------------


@pytest.mark.parametrize(("options", "parameter", "value"), INVALID)
def test_invalid_setting_raises_when_concurrent_is_below_app_task(
    app: Celery, options: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:

        @app.task
        @concurrent(**options)
        def fetch(url: str) -> str:
            return url

    assert_names(caught.value, parameter, value)


@pytest.mark.parametrize(("options", "parameter", "value"), INVALID)
def test_invalid_setting_raises_when_concurrent_is_above_app_task(
    app: Celery, options: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:

        @concurrent(**options)
        @app.task
        def fetch(url: str) -> str:
            return url

    assert_names(caught.value, parameter, value)


@pytest.mark.parametrize(("options", "parameter", "value"), INVALID_FOR_ASYNC)
def test_sync_pool_on_async_function_raises_below_app_task(
    app: Celery, options: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:

        @app.task
        @concurrent(**options)
        async def ask(prompt: str) -> str:
            return prompt

    assert_names(caught.value, parameter, value)


@pytest.mark.parametrize(("options", "parameter", "value"), INVALID_FOR_ASYNC)
def test_sync_pool_on_async_function_raises_above_app_task(
    app: Celery, options: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:

        @concurrent(**options)
        @app.task
        async def ask(prompt: str) -> str:
            return prompt

    assert_names(caught.value, parameter, value)


def test_sync_pool_on_plain_async_function_raises() -> None:
    with pytest.raises(ConfigurationError) as caught:

        @concurrent(pool="gevent")
        async def ask(prompt: str) -> str:
            return prompt

    assert_names(caught.value, "pool", "gevent")


# --- A valid decoration gives the right spec ---------------------------------------------

SEED_OPTIONS = {
    "allow_concurrent_inputs": 20,
    "concurrency_limit": 5,
    "keep_warm": 1,
    "container_idle_timeout": 30,
}
EXPECTED_SETTINGS = {
    "max_inputs": 20,
    "target_inputs": 20,
    "max_containers": 5,
    "min_containers": 1,
    "scaledown_window": 30.0,
}


def expected_spec(task: Any, **settings: Any) -> FunctionSpec:
    return FunctionSpec(name=task.name, queue=f"concurrent.{task.name}", **settings)


def test_concurrent_below_app_task_gives_the_spec(app: Celery) -> None:
    @app.task
    @concurrent(**SEED_OPTIONS)
    def fetch(url: str) -> str:
        return url

    assert spec_of(fetch) == expected_spec(fetch, **EXPECTED_SETTINGS)


def test_concurrent_above_app_task_gives_the_spec(app: Celery) -> None:
    @concurrent(**SEED_OPTIONS)
    @app.task
    def fetch(url: str) -> str:
        return url

    assert spec_of(fetch) == expected_spec(fetch, **EXPECTED_SETTINGS)


def test_task_options_give_the_spec(app: Celery) -> None:
    @app.task(allow_concurrent_inputs=10, concurrency_limit=3)
    def fetch(url: str) -> str:
        return url

    assert spec_of(fetch) == expected_spec(fetch, max_inputs=10, target_inputs=10, max_containers=3)


def test_invalid_task_option_is_reported_when_the_spec_is_read(app: Celery) -> None:
    @app.task(allow_concurrent_inputs=0)
    def fetch(url: str) -> str:
        return url

    with pytest.raises(ConfigurationError) as caught:
        spec_of(fetch)
    assert_names(caught.value, "allow_concurrent_inputs", 0)


def test_bare_concurrent_gives_the_defaults(app: Celery) -> None:
    @app.task
    @concurrent
    def fetch(url: str) -> str:
        return url

    assert spec_of(fetch) == expected_spec(fetch)


def test_async_function_spec_uses_the_asyncio_pool(app: Celery) -> None:
    @app.task
    @concurrent(allow_concurrent_inputs=500)
    async def ask(prompt: str) -> str:
        return prompt

    assert spec_of(ask) == expected_spec(
        ask, is_async=True, max_inputs=500, target_inputs=500, pool="asyncio"
    )


def test_gpu_setting_is_parsed_into_the_spec(app: Celery) -> None:
    @app.task
    @concurrent(allow_concurrent_inputs=8, gpu="a100", concurrency_limit=2)
    def embed(texts: list[str]) -> int:
        return len(texts)

    spec = spec_of(embed)
    assert spec is not None
    assert spec.gpu == (GpuRequest("A100", 1),)


def test_spec_of_a_plain_task_is_none(app: Celery) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert spec_of(add) is None


def test_queue_defaults_to_concurrent_dot_task_name(app: Celery) -> None:
    @app.task(name="proj.fetch")
    @concurrent(max_inputs=2)
    def fetch(url: str) -> str:
        return url

    spec = spec_of(fetch)
    assert spec is not None
    assert spec.queue == "concurrent.proj.fetch"


@pytest.mark.parametrize("order", ["below-app-task", "above-app-task"])
def test_queue_option_overrides_the_default_queue(app: Celery, order: str) -> None:
    def fetch(url: str) -> str:
        return url

    if order == "below-app-task":
        task = app.task(concurrent(queue="fetchers")(fetch))
    else:
        task = concurrent(queue="fetchers")(app.task(fetch))
    spec = spec_of(task)
    assert spec is not None
    assert spec.queue == "fetchers"


# Celery deprecates the task's own queue option, but code that sets it must still work.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_task_queue_option_is_the_function_queue(app: Celery) -> None:
    @app.task(queue="fetchers")
    @concurrent(max_inputs=2)
    def fetch(url: str) -> str:
        return url

    spec = spec_of(fetch)
    assert spec is not None
    assert spec.queue == "fetchers"


# --- Runtime updates: FunctionSpec.with_bounds -------------------------------------------


@pytest.fixture
def base_spec() -> FunctionSpec:
    return FunctionSpec.from_options(
        "proj.embed",
        {
            "allow_concurrent_inputs": 10,
            "concurrency_limit": 3,
            "keep_warm": 1,
            "gpu": ["H100:2", "any"],
            "pool": "gevent",
            "queue": "embedders",
        },
    )


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        pytest.param({"keep_warm": 2}, {"min_containers": 2}, id="keep_warm"),
        pytest.param({"min_containers": 2}, {"min_containers": 2}, id="min_containers"),
        pytest.param({"concurrency_limit": 7}, {"max_containers": 7}, id="concurrency_limit"),
        pytest.param({"max_containers": None}, {"max_containers": None}, id="unbounded"),
        pytest.param({"buffer_containers": 2}, {"buffer_containers": 2}, id="buffer_containers"),
        pytest.param(
            {"container_idle_timeout": 5}, {"scaledown_window": 5.0}, id="container_idle_timeout"
        ),
        pytest.param({"target_inputs": 4}, {"target_inputs": 4}, id="target_inputs"),
        pytest.param(
            {"max_inputs": 20}, {"max_inputs": 20, "target_inputs": 20}, id="raised-max_inputs"
        ),
        pytest.param(
            {"allow_concurrent_inputs": 4},
            {"max_inputs": 4, "target_inputs": 4},
            id="lowered-allow_concurrent_inputs",
        ),
        pytest.param(
            {"max_inputs": 20, "target_inputs": 5},
            {"max_inputs": 20, "target_inputs": 5},
            id="max_inputs-and-target_inputs",
        ),
    ],
)
def test_with_bounds_changes_only_the_given_bounds(
    base_spec: FunctionSpec, bounds: dict[str, Any], expected: dict[str, Any]
) -> None:
    updated = base_spec.with_bounds(**bounds)
    assert updated == dataclasses.replace(base_spec, **expected)


def test_with_bounds_keeps_a_lower_target_capped_by_the_new_max_inputs(
    base_spec: FunctionSpec,
) -> None:
    aiming_low = base_spec.with_bounds(target_inputs=6)
    assert aiming_low.with_bounds(max_inputs=20).target_inputs == 6
    assert aiming_low.with_bounds(max_inputs=4).target_inputs == 4


def test_with_bounds_leaves_the_original_unchanged(base_spec: FunctionSpec) -> None:
    before = dataclasses.replace(base_spec)
    base_spec.with_bounds(keep_warm=3, concurrency_limit=8)
    assert base_spec == before


@pytest.mark.parametrize(
    ("bounds", "parameter", "value"),
    [
        _case({"keep_warm": 5}, "keep_warm", 5, "keep_warm>concurrency_limit"),
        _case({"min_containers": 5}, "min_containers", 5, "min_containers>max_containers"),
        _case({"concurrency_limit": 0}, "concurrency_limit", 0, "zero-concurrency_limit"),
        _case({"allow_concurrent_inputs": 0}, "allow_concurrent_inputs", 0, "zero-max-inputs"),
        _case({"max_inputs": "x"}, "max_inputs", "x", "max_inputs-not-a-number"),
        _case({"max_inputs": None}, "max_inputs", None, "max_inputs-None"),
        _case({"target_inputs": 11}, "target_inputs", 11, "target_inputs>max_inputs"),
        _case({"buffer_containers": -1}, "buffer_containers", -1, "negative-buffer"),
        _case({"scaledown_window": 0}, "scaledown_window", 0, "zero-timeout"),
        _case({"scaledown_window": math.inf}, "scaledown_window", math.inf, "infinite-timeout"),
        _case({"keep_warm": 1, "min_containers": 1}, "keep_warm", 1, "both-spellings"),
        _case({"gpu": "A100"}, "gpu", "A100", "gpu-is-not-a-bound"),
        _case({"pool": "threads"}, "pool", "threads", "pool-is-not-a-bound"),
        _case({"queue": "other"}, "queue", "other", "queue-is-not-a-bound"),
        _case({"bogus": 1}, "bogus", 1, "unknown-keyword"),
    ],
)
def test_with_bounds_validates_like_the_decorator(
    base_spec: FunctionSpec, bounds: dict[str, Any], parameter: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        base_spec.with_bounds(**bounds)
    assert_names(caught.value, parameter, value)


def test_with_bounds_lowering_the_limit_below_keep_warm_names_the_limit(
    base_spec: FunctionSpec,
) -> None:
    warm = base_spec.with_bounds(keep_warm=3)
    with pytest.raises(ConfigurationError) as caught:
        warm.with_bounds(concurrency_limit=2)
    assert "concurrency_limit=2" in str(caught.value)
