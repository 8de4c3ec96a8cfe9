"""Dynamic batching: what ``@batched`` makes of a function, and its settings.

A batched function takes one list per parameter and returns one result per item. Celery
sees the *item runner* instead: a function with the batched function's parameters that
runs one input. Callers send one input and get that input's result; each input stays a
Celery task of its own (id, state, result, signals, links), and only the body is shared.

Inside a container the item runner hands its input to the container's collector
(``container/batches.py``), which gathers the inputs that arrive close together into
batches. Anywhere else (``task.apply()``, ``task_always_eager``, a plain worker) it runs a
batch of one.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from greenlet import getcurrent

from .asyncbridge import InputGreenlet, original_async, run_coroutine
from .constants import MAX_BATCH_SIZE_LIMIT, MAX_WAIT_MS
from .errors import BatchResultError, ConfigurationError

#: the keywords of ``@batched`` (and the task options that mean the same)
BATCH_OPTION_NAMES = ("max_batch_size", "wait_ms")
#: where the item runner keeps what it runs
BATCHED_ATTR = "__celery_concurrent_batched__"


@dataclass(frozen=True)
class BatchSettings:
    """The validated settings of one batched function.

    Parameters
    ----------
    max_batch_size:
        The most items one call of the function receives (1 to 1000).
    wait_ms:
        How long the first item of a batch may wait for others, in milliseconds (0 to
        600000). A batch goes sooner when it is full, or when a slot is free and the
        function's queue is empty.
    """

    max_batch_size: int
    wait_ms: int

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> BatchSettings:
        """Validate ``max_batch_size`` and ``wait_ms``; both are required.

        Raises :class:`ConfigurationError` naming the parameter and the value.
        """
        unknown = sorted(set(options) - set(BATCH_OPTION_NAMES))
        if unknown:
            raise ConfigurationError(
                unknown[0],
                options[unknown[0]],
                f"unknown setting; expected one of {', '.join(BATCH_OPTION_NAMES)}",
            )
        for name in BATCH_OPTION_NAMES:
            if options.get(name) is None:
                raise ConfigurationError(
                    name, None, "is required: give both max_batch_size and wait_ms"
                )
        return cls(
            max_batch_size=_bounded(
                "max_batch_size", options["max_batch_size"], 1, MAX_BATCH_SIZE_LIMIT
            ),
            wait_ms=_bounded("wait_ms", options["wait_ms"], 0, MAX_WAIT_MS),
        )


def _bounded(parameter: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(parameter, value, "must be a whole number")
    if not low <= value <= high:
        raise ConfigurationError(parameter, value, f"must be between {low} and {high}")
    return value


@dataclass(frozen=True)
class Batched:
    """What an item runner runs: the batched function, its parameters and settings."""

    fn: Callable[..., Any]
    settings: BatchSettings
    signature: inspect.Signature
    is_async: bool

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """One item's value of each parameter, in order; a ``TypeError`` fails the item."""
        bound = self.signature.bind(*args, **kwargs)
        return tuple(bound.arguments[name] for name in self.signature.parameters)

    def call(self, items: Sequence[tuple[Any, ...]]) -> Any:
        """Call the function on a batch: one list per parameter (a coroutine if async)."""
        positional: list[list[Any]] = []
        keywords: dict[str, list[Any]] = {}
        for index, (name, param) in enumerate(self.signature.parameters.items()):
            column = [item[index] for item in items]
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                keywords[name] = column
            else:
                positional.append(column)
        return self.fn(*positional, **keywords)

    def results(self, returned: Any, size: int) -> list[Any]:
        """The per-item results of a batch of ``size``; :class:`BatchResultError` if the
        function did not return one result per item."""
        try:
            count = len(returned)
        except TypeError:
            raise BatchResultError(
                f"{self.name} returned {type(returned).__name__}, not a list of {size} "
                f"results (one per item)"
            ) from None
        if count != size:
            raise BatchResultError(
                f"{self.name} returned {count} results for a batch of {size} items"
            )
        return list(returned)


def check_batchable(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature of a function ``@batched`` may decorate.

    Raises :class:`ConfigurationError` naming the parameter: a batch cannot mix ``*args``
    or ``**kwargs`` of different shapes, nor items that leave a default out.
    """
    signature = inspect.signature(fn)
    if not signature.parameters:
        raise ConfigurationError(
            "parameters",
            str(signature),
            f"{getattr(fn, '__qualname__', fn)} takes none; a @batched function takes one "
            "list per parameter",
        )
    for name, param in signature.parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            star = "*" if param.kind is inspect.Parameter.VAR_POSITIONAL else "**"
            raise ConfigurationError(
                f"{star}{name}", str(signature), "a @batched function takes no *args or **kwargs"
            )
        if param.default is not inspect.Parameter.empty:
            raise ConfigurationError(
                name,
                param.default,
                "a parameter of a @batched function has no default: every item gives each",
            )
    return signature


class Collector(Protocol):
    """Gathers items into batches (a container's, in ``container/batches.py``)."""

    def submit(self, values: tuple[Any, ...]) -> Coroutine[Any, Any, Any]: ...


# The collector each item runner hands its items to, in a container that serves it.
_collectors: weakref.WeakKeyDictionary[Callable[..., Any], Collector] = weakref.WeakKeyDictionary()


def batch_runner(fn: Callable[..., Any], settings: BatchSettings) -> Callable[..., Any]:
    """The item runner of ``fn``: called with one input, returns that input's result."""
    raw = original_async(fn) or fn
    batched = Batched(raw, settings, check_batchable(raw), inspect.iscoroutinefunction(raw))

    @functools.wraps(raw)
    def run_item(*args: Any, **kwargs: Any) -> Any:
        values = batched.bind(args, kwargs)
        collector = _collectors.get(run_item)
        if collector is not None and isinstance(getcurrent(), InputGreenlet):
            return run_coroutine(collector.submit(values))
        return _run_alone(batched, values)

    run_item.__signature__ = batched.signature  # type: ignore[attr-defined]
    setattr(run_item, BATCHED_ATTR, batched)
    return run_item


def _run_alone(batched: Batched, values: tuple[Any, ...]) -> Any:
    returned = batched.call([values])
    if batched.is_async:
        returned = run_coroutine(returned)
    return batched.results(returned, 1)[0]


def batched_of(fn: Any) -> Batched | None:
    """What an item runner runs, if ``fn`` (or the staticmethod holding it) is one."""
    raw = fn.__func__ if isinstance(fn, staticmethod) else fn
    found = getattr(raw, BATCHED_ATTR, None)
    return found if isinstance(found, Batched) else None


def serve(runner: Callable[..., Any], collector: Collector | None) -> None:
    """Hand ``runner``'s items to ``collector`` in this process (``None``: run alone)."""
    if collector is None:
        _collectors.pop(runner, None)
    else:
        _collectors[runner] = collector
