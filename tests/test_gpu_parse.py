"""parse_gpu: the ``gpu=`` setting of a function, and its errors at decoration time."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_concurrent import (
    ConfigurationError,
    GpuRequest,
    GpuSpecError,
    concurrent,
    parse_gpu,
    spec_of,
)

ANY = GpuRequest("ANY", 1)
A100 = GpuRequest("A100", 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="none-means-cpu"),
        pytest.param("any", (ANY,), id="any"),
        pytest.param("ANY", (ANY,), id="ANY"),
        pytest.param("any:2", (GpuRequest("ANY", 2),), id="any-with-count"),
        pytest.param("A100", (A100,), id="A100"),
        pytest.param("a100", (A100,), id="model-is-case-insensitive"),
        pytest.param("H100:2", (GpuRequest("H100", 2),), id="H100:2"),
        pytest.param("h100:2", (GpuRequest("H100", 2),), id="h100:2"),
        pytest.param("A100:1", (A100,), id="explicit-count-of-one"),
        pytest.param(" A100 ", (A100,), id="surrounding-spaces-ignored"),
        pytest.param("L40S", (GpuRequest("L40S", 1),), id="L40S"),
        pytest.param("rtx-4090", (GpuRequest("RTX-4090", 1),), id="model-with-dash"),
        pytest.param("A100-80GB:8", (GpuRequest("A100-80GB", 8),), id="A100-80GB:8"),
        pytest.param(
            ["H100", "A100:2", "any"],
            (GpuRequest("H100", 1), GpuRequest("A100", 2), ANY),
            id="fallbacks-in-order",
        ),
        pytest.param(
            ["any", "H100"], (ANY, GpuRequest("H100", 1)), id="fallbacks-keep-given-order"
        ),
        pytest.param(("A100", "H100:2"), (A100, GpuRequest("H100", 2)), id="tuple-of-fallbacks"),
        pytest.param(["A100"], (A100,), id="single-item-list"),
    ],
)
def test_gpu_value_parses_to_requests_in_order_of_preference(
    value: Any, expected: tuple[GpuRequest, ...] | None
) -> None:
    assert parse_gpu(value) == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param("any", "any", id="any"),
        pytest.param("a100", "A100", id="A100"),
        pytest.param("h100:2", "H100:2", id="H100:2"),
        pytest.param("A100:1", "A100", id="count-of-one-omitted"),
    ],
)
def test_gpu_request_prints_in_its_canonical_form(value: str, text: str) -> None:
    (request,) = parse_gpu(value) or ()
    assert str(request) == text
    assert parse_gpu(str(request)) == (request,)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("A100:0", id="zero-count"),
        pytest.param("A100:-1", id="negative-count"),
        pytest.param("A100:x", id="count-not-a-number"),
        pytest.param("A100:1.5", id="fractional-count"),
        pytest.param("A100:", id="missing-count"),
        pytest.param("A100:\N{SUPERSCRIPT TWO}", id="non-ascii-digit-count"),
        pytest.param(":2", id="missing-model"),
        pytest.param("A100:2:3", id="two-counts"),
        pytest.param("", id="empty-string"),
        pytest.param("  ", id="blank-string"),
        pytest.param("A 100", id="space-inside-model"),
        pytest.param([], id="empty-list"),
        pytest.param((), id="empty-tuple"),
        pytest.param(["A100", 2], id="non-string-item"),
        pytest.param([None], id="none-item"),
        pytest.param(["A100", "H100:0"], id="bad-item-in-list"),
        pytest.param(["A100", "A100"], id="duplicate-entry"),
        pytest.param(["A100", "a100"], id="duplicate-entry-other-case"),
        pytest.param(["A100", "A100:1"], id="duplicate-entry-explicit-count"),
        pytest.param(["any", "ANY"], id="duplicate-any"),
        pytest.param(2, id="number"),
        pytest.param({"A100"}, id="set-has-no-order"),
    ],
)
def test_bad_gpu_value_is_rejected_naming_parameter_and_value(value: Any) -> None:
    with pytest.raises(GpuSpecError) as caught:
        parse_gpu(value)
    error = caught.value
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, ValueError)
    assert error.parameter == "gpu"
    assert "gpu" in str(error)
    assert repr(value) in str(error)


def test_gpu_error_names_the_parameter_it_is_given() -> None:
    with pytest.raises(GpuSpecError, match=r"^gpus='A100:0'"):
        parse_gpu("A100:0", parameter="gpus")


@pytest.mark.parametrize("value", ["A100:0", ":2", [], ["A100", "a100"]], ids=repr)
def test_bad_gpu_raises_when_concurrent_is_below_app_task(app: Celery, value: Any) -> None:
    with pytest.raises(GpuSpecError) as caught:

        @app.task
        @concurrent(gpu=value)
        def embed(texts: list[str]) -> int:
            return len(texts)

    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("value", ["A100:0", ":2", [], ["A100", "a100"]], ids=repr)
def test_bad_gpu_raises_when_concurrent_is_above_app_task(app: Celery, value: Any) -> None:
    with pytest.raises(GpuSpecError) as caught:

        @concurrent(gpu=value)
        @app.task
        def embed(texts: list[str]) -> int:
            return len(texts)

    assert repr(value) in str(caught.value)


def test_gpu_fallbacks_reach_the_spec_in_order(app: Celery) -> None:
    @app.task
    @concurrent(allow_concurrent_inputs=8, gpu=["h100:2", "A100", "any"])
    def embed(texts: list[str]) -> int:
        return len(texts)

    spec = spec_of(embed)
    assert spec is not None
    assert spec.gpu == (GpuRequest("H100", 2), A100, ANY)
    assert spec.as_dict()["gpu"] == ["H100:2", "A100", "any"]
