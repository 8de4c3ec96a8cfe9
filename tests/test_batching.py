"""``@batched``: one call of the function for many inputs, each input a task of its own.

Real Redis, real containers (``celery worker --concurrent-function``) and, for the
autoscaled tests, a real node.
"""

from __future__ import annotations

import time

import pytest
from celery import group

from celery_concurrent import BatchResultError

from .support import row, running, wait_for

APP = "tests.apps.batching"


def container(workers, name: str, *args: str):
    return workers.start(APP, "--concurrent-function", f"{APP}.{name}", *args)


def test_each_caller_gets_its_own_result_under_a_burst(batching_app, workers):
    calls = group(batching_app.double.s(n, 0.05) for n in range(300)).apply_async()
    container(workers, "double")
    assert calls.get(timeout=60) == [2 * n for n in range(300)]
    sizes = batching_app.sizes("double")
    assert sum(sizes) == 300
    # A backlog fills the batches; none is ever larger than max_batch_size.
    assert max(sizes) == 8
    assert sum(sizes) / len(sizes) > 6, sizes


def test_a_container_runs_max_inputs_batches_at_once_and_holds_no_more(batching_app, workers, rds):
    queue = f"concurrent.{APP}.hold"
    calls = group(batching_app.hold.s(f"k{n}") for n in range(60)).apply_async()
    container(workers, "hold")
    # Two batches of eight run (each held by its first key), and the container holds
    # no input beyond them: the rest waits in the broker's queue.
    wait_for(lambda: len(batching_app.sizes("hold")) == 2, 60, what="two batches running")
    for _ in range(5):
        assert rds.llen(queue) == 60 - 16
        assert batching_app.sizes("hold") == [8, 8]
        time.sleep(0.1)
    for n in range(60):
        batching_app.recorder.release(f"k{n}")
    assert calls.get(timeout=60) == [f"k{n}" for n in range(60)]
    assert max(batching_app.sizes("hold")) == 8


def test_async_batched_function_gets_one_list_per_parameter(batching_app, workers, rds):
    calls = group(batching_app.add.s(n, 1000) for n in range(200)).apply_async()
    container(workers, "add")
    assert calls.get(timeout=60) == [n + 1000 for n in range(200)]
    sizes = batching_app.sizes("add")
    assert sum(sizes) == 200 and max(sizes) == 16
    assert int(rds.get("peak:add")) <= 3


def test_task_options_make_a_batched_function(batching_app, workers):
    calls = group(batching_app.negate.s(n) for n in range(40)).apply_async()
    container(workers, "negate")
    assert calls.get(timeout=60) == [-n for n in range(40)]
    assert max(batching_app.sizes("negate")) == 4


def test_a_lone_input_does_not_wait_for_company(batching_app, workers):
    container(workers, "lone")
    batching_app.lone.delay(0).get(timeout=30)  # the container is warm
    for n in range(5):
        began = time.monotonic()
        assert batching_app.lone.delay(n).get(timeout=30) == n
        # The queue is empty and a slot is free: it goes at once, not after wait_ms (3 s).
        assert time.monotonic() - began < 1.0
    assert batching_app.sizes("lone") == [1] * 6


def batch_of(batches: list[list[str]], word: str) -> list[str]:
    (batch,) = (b for b in batches if word in b)
    return batch


def test_an_exception_fails_every_item_of_its_batch_and_no_other(batching_app, workers):
    words = ["a", "boom", "b", "c", "d", "e", "f", "g"]
    calls = dict(zip(words, (batching_app.fragile.delay(w) for w in words), strict=True))
    container(workers, "fragile")
    for call in calls.values():
        call.get(timeout=30, propagate=False)
    # The container holds one batch of at most four, so eight items run in two or more
    # batches; which item lands in which depends on when each arrived, so the batches
    # the function really ran say which items must fail.
    batches = batching_app.batches("fragile")
    assert sorted(w for b in batches for w in b) == sorted(words)
    assert len(batches) >= 2 and max(map(len, batches)) == 4
    failed = batch_of(batches, "boom")
    for word, call in calls.items():
        if word in failed:
            with pytest.raises(ValueError, match="boom in"):
                call.get(timeout=1)
            assert call.state == "FAILURE"
            # Each item stores the traceback, down to the function's own frame.
            assert "in fragile" in call.traceback and "ValueError" in call.traceback
        else:
            assert call.get(timeout=1) == word.upper()


def test_a_result_list_of_the_wrong_length_fails_every_item(batching_app, workers):
    words = ["a", "b", "short", "c"]
    calls = dict(zip(words, (batching_app.fragile.delay(w) for w in words), strict=True))
    container(workers, "fragile")
    for call in calls.values():
        call.get(timeout=30, propagate=False)
    short = batch_of(batching_app.batches("fragile"), "short")
    message = f"fragile returned {len(short) - 1} results for a batch of {len(short)} items"
    for word, call in calls.items():
        if word in short:
            with pytest.raises(BatchResultError, match=message):
                call.get(timeout=1)
        else:
            assert call.get(timeout=1) == word.upper()


def test_an_item_with_bad_arguments_fails_alone_before_the_batch(batching_app, workers):
    name = f"{APP}.fragile"
    bad = batching_app.app.send_task(name, args=("x", "y"))
    good = [batching_app.fragile.delay(w) for w in ["a", "b", "c"]]
    container(workers, "fragile")
    with pytest.raises(TypeError, match="too many positional arguments"):
        bad.get(timeout=30)
    assert [c.get(timeout=30) for c in good] == ["A", "B", "C"]
    assert sum(batching_app.sizes("fragile")) == 3


def test_each_item_is_a_task_its_links_run_with_its_own_result(batching_app, workers):
    chains = [(batching_app.negate.s(n) | batching_app.negate.s()).apply_async() for n in range(8)]
    container(workers, "negate")
    assert [c.get(timeout=30) for c in chains] == list(range(8))
    ids = {c.parent.id for c in chains}
    assert len(ids) == 8 and all(c.parent.state == "SUCCESS" for c in chains)


def test_node_scales_batched_containers_and_shows_the_batch_sizes(batching_app, workers, rds):
    workers.start(APP, "-c", "1", "--concurrent-functions", f"{APP}.double")
    calls = group(batching_app.double.s(n, 0.2) for n in range(400)).apply_async()
    assert calls.get(timeout=90) == [2 * n for n in range(400)]
    # max_inputs=2 batches per container, max_containers=2: four batches at once at most.
    assert int(rds.get("peak:double")) <= 4
    wait_for(lambda: row(batching_app, f"{APP}.double")["batched_items"] == 400, 30)
    status = row(batching_app, f"{APP}.double")
    assert status["max_batch_size"] == 8 and status["wait_ms"] == 200
    assert sum(status["batch_sizes"]) == status["batches"] == len(batching_app.sizes("double"))
    assert status["batch_size_mean"] == pytest.approx(400 / status["batches"], abs=0.01)
    assert running(rds, "double") == 0
