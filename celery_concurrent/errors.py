"""Errors raised by celery-concurrent."""

from __future__ import annotations

from typing import Any


class ConcurrentError(Exception):
    """Base class of every error this package raises."""


class ConfigurationError(ConcurrentError, ValueError):
    """A setting of ``@concurrent`` (or an operator command) has a bad value.

    The message always names the parameter and the value it was given.
    """

    def __init__(self, parameter: str, value: Any, reason: str) -> None:
        self.parameter = parameter
        self.value = value
        self.reason = reason
        super().__init__(f"{parameter}={value!r}: {reason}")


class GpuSpecError(ConfigurationError):
    """A ``gpu=`` value could not be parsed."""


class DecoratorOrderError(ConcurrentError, TypeError):
    """``@concurrent`` was stacked where it cannot reach the task it decorates."""


class UnknownFunctionError(ConcurrentError, LookupError):
    """A task name does not name a ``@concurrent`` function of the app."""

    def __init__(self, name: str, known: list[str] | tuple[str, ...] = ()) -> None:
        self.name = name
        hint = f"; known functions: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"{name!r} is not a @concurrent function of this app{hint}")


class BatchResultError(ConcurrentError):
    """A ``@batched`` function did not return one result per item of its batch."""
