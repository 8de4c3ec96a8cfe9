"""Waiting on a condition, for the tests, the examples and the benchmarks alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    error: type[Exception] = AssertionError,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises ``error`` (``AssertionError`` by default: a test's failure) naming ``what``
    once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"{what} not met within {timeout:g}s")
        time.sleep(interval)
