"""``@batched`` in one process: its settings, the decorator orders, a batch's rules.

What crosses processes (containers, the node, the broker) is in ``test_batching.py``.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_concurrent import BatchResultError, ConfigurationError, batched, concurrent, spec_of
from celery_concurrent.batching import batched_of
from celery_concurrent.container.batches import Batcher, BatchStats
from celery_concurrent.status import FunctionStatus, merge
from celery_concurrent.supervisor.metrics import batch_size_histogram


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_batch_size": 0, "wait_ms": 10}, "max_batch_size=0: must be between 1 and 1000"),
        ({"max_batch_size": 1001, "wait_ms": 10}, "max_batch_size=1001: must be between 1"),
        ({"max_batch_size": 2.5, "wait_ms": 10}, "max_batch_size=2.5: must be a whole number"),
        ({"max_batch_size": True, "wait_ms": 10}, "max_batch_size=True: must be a whole"),
        ({"max_batch_size": 8, "wait_ms": -1}, "wait_ms=-1: must be between 0 and 600000"),
        ({"max_batch_size": 8, "wait_ms": 600_001}, "wait_ms=600001: must be between 0"),
        ({"max_batch_size": 8, "wait_ms": "5"}, "wait_ms='5': must be a whole number"),
        ({"max_batch_size": 8}, "wait_ms=None: is required"),
        ({"wait_ms": 8}, "max_batch_size=None: is required"),
    ],
)
def test_bad_settings_are_refused_naming_the_parameter_and_value(settings, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        batched(**settings)


def test_bare_batched_needs_its_settings():
    with pytest.raises(ConfigurationError, match="max_batch_size=None: is required"):
        batched(lambda xs: xs)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(*xs): ...", r"\*xs='\(\*xs\)': a @batched function takes no \*args"),
        ("def f(xs, **kw): ...", r"\*\*kw=.*takes no \*args or \*\*kwargs"),
        ("def f(xs, n=3): ...", "n=3: a parameter of a @batched function has no default"),
        ("async def f(xs=None): ...", "xs=None: a parameter of a @batched function"),
        ("def f(): ...", r"parameters='\(\)': f takes none"),
    ],
)
def test_functions_a_batch_cannot_call_are_refused(source, message):
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    with pytest.raises(ConfigurationError, match=message):
        batched(max_batch_size=4, wait_ms=1)(namespace["f"])


def test_every_order_and_task_options_give_the_same_spec(app):
    @app.task
    @concurrent(max_inputs=4)
    @batched(max_batch_size=8, wait_ms=5)
    def below(xs):
        return xs

    @app.task
    @batched(max_batch_size=8, wait_ms=5)
    @concurrent(max_inputs=4)
    async def between(xs):
        return xs

    @concurrent(max_inputs=4)
    @batched(max_batch_size=8, wait_ms=5)
    @app.task
    def above(xs):
        return xs

    @app.task(max_batch_size=8, wait_ms=5, max_inputs=4)
    async def options(xs):
        return xs

    app.finalize()
    for task, is_async in ((below, False), (between, True), (above, False), (options, True)):
        spec = spec_of(task)
        assert (spec.max_batch_size, spec.wait_ms, spec.max_inputs) == (8, 5, 4)
        assert spec.is_async is is_async
        assert (spec.max_items, spec.target_items) == (32, 32)
        assert batched_of(type(app.tasks[task.name]).__dict__["run"]) is not None


def test_batched_alone_is_a_function_with_one_batch_per_container(app):
    @app.task
    @batched(max_batch_size=3, wait_ms=0)
    def alone(xs):
        return xs

    spec = spec_of(alone)
    assert (spec.max_inputs, spec.max_items) == (1, 3)
    assert spec.queue == f"concurrent.{alone.name}"


def test_outside_a_container_an_input_runs_as_a_batch_of_one(app):
    seen = []

    @app.task
    @batched(max_batch_size=8, wait_ms=5)
    def pair(xs, ys, *, scale):
        seen.append((xs, ys, scale))
        return [(x + y) * s for x, y, s in zip(xs, ys, scale, strict=True)]

    @app.task
    @batched(max_batch_size=8, wait_ms=5)
    async def short(xs):
        return []

    assert pair.apply(args=(1, 2), kwargs={"scale": 10}).get() == 30
    assert seen == [([1], [2], [10])]
    with pytest.raises(TypeError, match="missing a required argument: 'scale'"):
        pair.apply(args=(1, 2)).get()
    with pytest.raises(BatchResultError, match="short returned 0 results for a batch of 1"):
        short.apply(args=(1,)).get()


def test_invalid_task_options_are_reported_when_the_spec_is_read(app):
    @app.task(max_batch_size=8)
    def half(xs):
        return xs

    with pytest.raises(ConfigurationError, match="wait_ms=None: is required"):
        spec_of(half)


def test_a_bound_task_cannot_be_batched(app):
    @app.task(bind=True)
    def bound(self, xs):
        return xs

    with pytest.raises(ConfigurationError, match="bind=True"):
        batched(max_batch_size=8, wait_ms=5)(bound)
        app.finalize()  # the task is made, and batched, now


def test_a_batched_function_takes_no_gevent_pool(app):
    @app.task
    @concurrent(pool="gevent")
    @batched(max_batch_size=8, wait_ms=5)
    def green(xs):
        return xs

    with pytest.raises(ConfigurationError, match="pool='gevent'"):
        spec_of(green)


# -- the rules of a batch, on an event loop with a stand-in for the broker -------------


class QueueNeverEmpty:
    def is_empty(self) -> bool:
        return False


class QueueEmpty:
    def is_empty(self) -> bool:
        return True


def batcher_of(fn, probe, *, max_inputs=1, max_batch_size=4, wait_ms=50) -> Batcher:
    runner = batched(max_batch_size=max_batch_size, wait_ms=wait_ms)(fn)
    return Batcher(batched_of(runner), max_inputs, probe, BatchStats())


def test_a_batch_goes_after_wait_ms_while_the_queue_is_not_empty():
    calls = []

    def fn(xs):
        calls.append((list(xs), time.monotonic()))
        return xs

    batcher = batcher_of(fn, QueueNeverEmpty(), wait_ms=80)

    async def main():
        began = time.monotonic()
        results = await asyncio.gather(*(batcher.submit((n,)) for n in range(3)))
        return began, results

    began, results = asyncio.run(main())
    assert results == [0, 1, 2]
    assert calls[0][0] == [0, 1, 2]
    assert 0.07 <= calls[0][1] - began < 1.0


def test_a_full_batch_goes_at_once_and_at_most_max_inputs_run():
    running, peak = 0, 0

    async def fn(xs):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return [x * 2 for x in xs]

    batcher = batcher_of(fn, QueueNeverEmpty(), max_inputs=2, wait_ms=60_000)

    async def main():
        return await asyncio.gather(*(batcher.submit((n,)) for n in range(16)))

    began = time.monotonic()
    assert asyncio.run(main()) == [n * 2 for n in range(16)]
    assert time.monotonic() - began < 5  # never waited for wait_ms
    assert peak == 2
    assert batcher.stats.snapshot() == ((0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0), 16)


def test_with_a_slot_free_and_the_queue_empty_a_batch_goes_at_once():
    batcher = batcher_of(lambda xs: xs, QueueEmpty(), wait_ms=60_000)
    began = time.monotonic()
    assert asyncio.run(batcher.submit(("lone",))) == "lone"
    assert time.monotonic() - began < 5


def test_every_item_raises_its_own_copy_of_the_batch_error():
    def fn(xs):
        raise KeyError("model down")

    batcher = batcher_of(fn, QueueNeverEmpty(), wait_ms=0)

    async def main():
        return await asyncio.gather(
            *(batcher.submit((n,)) for n in range(3)), return_exceptions=True
        )

    errors = asyncio.run(main())
    assert all(isinstance(e, KeyError) and e.args == ("model down",) for e in errors)
    assert len({id(e) for e in errors}) == len(errors)
    # Each carries the function's frames: the traceback stored on each item shows them.
    assert all("in fn" in "".join(traceback.format_exception(e)) for e in errors)


# -- what the nodes show ------------------------------------------------------------


def test_batch_sizes_add_up_over_nodes_and_give_the_mean():
    def node_row(sizes, items):
        return FunctionStatus(
            function="p.embed", queue="q", max_batch_size=8, batch_sizes=sizes, batched_items=items
        )

    first = [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]  # two batches of 5..8
    second = [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # one of 1, one of 8
    (merged,) = merge({"celery@a": [node_row(first, 14)], "celery@b": [node_row(second, 9)]})
    assert merged.batch_sizes == [1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
    assert merged.as_dict()["batches"] == 4
    assert merged.as_dict()["batch_size_mean"] == 5.75


def test_batch_size_histogram_is_cumulative_with_the_items_as_its_sum():
    rows = [
        {
            "function": "p.embed",
            "max_batch_size": 8,
            "batch_sizes": [1, 0, 0, 3],
            "batched_items": 20,
        },
        {"function": "p.fetch", "max_batch_size": None, "batch_sizes": [], "batched_items": 0},
    ]
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):
            yield batch_size_histogram(rows, "celery@web1")

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    (family,) = text_string_to_metric_families(generate_latest(registry).decode())
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert values[("celery_concurrent_batch_size_bucket", "1.0")] == 1
    assert values[("celery_concurrent_batch_size_bucket", "8.0")] == 4
    assert values[("celery_concurrent_batch_size_bucket", "+Inf")] == 4
    assert values[("celery_concurrent_batch_size_sum", None)] == 20
    assert {s.labels["function"] for s in family.samples} == {"p.embed"}
