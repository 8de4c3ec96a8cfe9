"""The ``@concurrent`` and ``@batched`` decorators.

Both work below ``@app.task`` (the reference's order) and above it, and with each other
in either order; Celery task options (``@app.task(allow_concurrent_inputs=10)``,
``@app.task(max_batch_size=32, wait_ms=20)``) work too once the plugin is installed on
the app.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from celery import Task, current_app
from celery.local import PromiseProxy, Proxy

from .asyncbridge import original_async
from .batching import BatchSettings, batch_runner, batched_of, check_batchable
from .errors import DecoratorOrderError
from .plugin import install
from .registry import (
    OPTIONS_ATTR,
    adopt_async_run,
    adopt_batched_run,
    is_async,
    record_batch_settings,
    record_options,
    runner_for,
    task_is_async,
)
from .spec import normalize_options

F = TypeVar("F", bound=Callable[..., Any])

# ``@shared_task`` gives a proxy that makes a new task for each app, later, out of the
# function it was given: only the function can carry the decorator's settings to them.
SHARED_TASK_ORDER = (
    "@concurrent must be applied below @shared_task, not above it: write @shared_task "
    "first, then @concurrent(...) on the line under it, just above the def"
)


@overload
def concurrent(fn: F, /) -> F: ...
@overload
def concurrent(fn: None = None, /, **options: Any) -> Callable[[F], F]: ...


def concurrent(fn: Any = None, /, **options: Any) -> Any:
    """Give a Celery task its own autoscaling pool of containers.

    Parameters
    ----------
    allow_concurrent_inputs, max_inputs:
        Hard cap on inputs one container runs at once (default 1).
    target_inputs:
        The per-container load the autoscaler aims for (default ``max_inputs``).
    concurrency_limit, max_containers:
        The most containers of this function (default: bounded by the node).
    keep_warm, min_containers:
        Containers kept running with no traffic (default 0).
    buffer_containers:
        Extra idle containers kept while the function is busy (default 0).
    container_idle_timeout, scaledown_window:
        Seconds a container may sit idle before it is retired (default 60).
    gpu:
        ``"any"``, ``"A100"``, ``"H100:2"`` (two devices per container) or a list of
        fallbacks in order of preference. Only nodes with such free devices run it.
    pool:
        ``"threads"`` (default) or ``"gevent"`` for sync functions.
    queue:
        The queue the inputs travel on (default ``concurrent.<task name>``, and
        ``concurrent.gpu.<task name>`` for a GPU function).

    Raises
    ------
    ConfigurationError
        At decoration time, naming the parameter and the value, for any bad setting.
    DecoratorOrderError
        At decoration time, when applied above ``@shared_task`` (it belongs below).
    """
    normalize_options(options)  # every check that does not depend on the function

    def decorate(target: Any) -> Any:
        return _apply(
            "@concurrent",
            target,
            lazy=lambda proxy: _decorate_lazy_task(proxy, options),
            task=lambda task: _decorate_task(task, options),
            function=lambda f: _decorate_function(f, options),
        )

    return decorate if fn is None else decorate(fn)


def _apply(
    decorator: str,
    target: Any,
    *,
    lazy: Callable[[PromiseProxy], Any],
    task: Callable[[Task], None],
    function: Callable[[Callable[..., Any]], Any],
) -> Any:
    """Decorate what ``target`` is: a pending ``@app.task``, a task, or a function."""
    if type(target) is Proxy:
        raise DecoratorOrderError(SHARED_TASK_ORDER.replace("@concurrent", decorator))
    if isinstance(target, PromiseProxy):
        return lazy(target)
    if isinstance(target, Task):
        task(target)
        return target
    if callable(target):
        return function(target)
    raise TypeError(f"{decorator} expects a function or a Celery task, got {target!r}")


def _decorate_function(fn: Callable[..., Any], options: Mapping[str, Any]) -> Callable[..., Any]:
    normalize_options(options, is_async=is_async(fn))
    wrapped = runner_for(fn)
    setattr(wrapped, OPTIONS_ATTR, dict(options))
    # The task is made from it later, by the app current then, or by each app that
    # finalizes (``@shared_task``); the plugin's finalize hook covers those.
    install(current_app._get_current_object())
    return wrapped


def _decorate_task(task: Task, options: Mapping[str, Any]) -> None:
    normalize_options(options, is_async=task_is_async(task))
    record_options(task, dict(options))
    adopt_async_run(task)
    install(task.app)


def _decorate_lazy_task(proxy: PromiseProxy, options: Mapping[str, Any]) -> PromiseProxy:
    # Evaluating the proxy now would bind the task to a configuration that may not be
    # loaded yet, so the task is decorated when Celery evaluates it. The checks that
    # depend on the function (an async one takes no sync pool) still run now.
    fn = _pending_function(proxy)
    if fn is not None:
        normalize_options(options, is_async=is_async(fn))

    def on_evaluated() -> None:
        _decorate_task(proxy._get_current_object(), options)

    proxy.__then__(on_evaluated)
    install(current_app._get_current_object())
    return proxy


def batched(fn: Any = None, /, *, max_batch_size: Any = None, wait_ms: Any = None) -> Any:
    """Run a function on batches of the inputs that arrive close together.

    The function takes one list per parameter, all of the batch's length, and returns a
    list of that length; callers send one input and get that input's result, each input
    a Celery task of its own. With ``@concurrent(max_inputs=N)`` a container runs up to
    N batches at once; alone, one.

    Parameters
    ----------
    max_batch_size:
        The most items in one call (1 to 1000). Required.
    wait_ms:
        How long a batch's first item may wait for more, in milliseconds (0 to 600000).
        Required. A batch goes sooner when it is full, or when a slot is free and the
        function's queue is empty.

    Raises
    ------
    ConfigurationError
        At decoration time, naming the parameter and the value: a setting out of range
        or missing, ``*args``, ``**kwargs`` or a default on the function.
    DecoratorOrderError
        At decoration time, when applied above ``@shared_task`` (it belongs below).
    """
    if fn is not None:  # bare ``@batched``: the settings are required
        BatchSettings.from_options({})
    settings = BatchSettings.from_options({"max_batch_size": max_batch_size, "wait_ms": wait_ms})

    def decorate(target: Any) -> Any:
        return _apply(
            "@batched",
            target,
            lazy=lambda proxy: _batch_lazy_task(proxy, settings),
            task=lambda task: _batch_task(task, settings),
            function=lambda f: _batch_function(f, settings),
        )

    return decorate


def _batch_lazy_task(proxy: PromiseProxy, settings: BatchSettings) -> PromiseProxy:
    pending = _pending_function(proxy)
    if pending is not None:
        check_batchable(original_async(pending) or pending)
    proxy.__then__(lambda: _batch_task(proxy._get_current_object(), settings))
    install(current_app._get_current_object())
    return proxy


def _batch_function(fn: Callable[..., Any], settings: BatchSettings) -> Callable[..., Any]:
    if batched_of(fn) is not None:
        raise DecoratorOrderError(f"{fn.__qualname__} is @batched already")
    runner = batch_runner(fn, settings)
    options = getattr(fn, OPTIONS_ATTR, None)  # @batched above @concurrent
    if options is not None:
        setattr(runner, OPTIONS_ATTR, dict(options))
    install(current_app._get_current_object())
    return runner


def _batch_task(task: Task, settings: BatchSettings) -> None:
    record_batch_settings(task, settings)
    adopt_batched_run(task, settings)
    install(task.app)


def _pending_function(proxy: PromiseProxy) -> Callable[..., Any] | None:
    """The function a pending ``@app.task`` proxy will make its task from, if it holds one.

    ``@app.task`` keeps the function among the arguments of the pending call; the garbage
    collector lists what an object refers to without naming any attribute of Celery's.
    """
    for held in gc.get_referents(proxy):
        if isinstance(held, tuple) and len(held) == 1 and inspect.isfunction(held[0]):
            return held[0]
    return None
