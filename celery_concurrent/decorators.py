"""The ``@concurrent`` decorator.

``@concurrent`` works below ``@app.task`` (the reference's order) and above it; Celery
task options (``@app.task(allow_concurrent_inputs=10)``) work too once the plugin is
installed on the app.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from celery import Task, current_app
from celery.local import PromiseProxy, Proxy

from .errors import DecoratorOrderError
from .plugin import install
from .registry import (
    OPTIONS_ATTR,
    adopt_async_run,
    is_async,
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
        if type(target) is Proxy:
            raise DecoratorOrderError(SHARED_TASK_ORDER)
        if isinstance(target, PromiseProxy):
            return _decorate_lazy_task(target, options)
        if isinstance(target, Task):
            _decorate_task(target, options)
            return target
        if callable(target):
            return _decorate_function(target, options)
        raise TypeError(f"@concurrent expects a function or a Celery task, got {target!r}")

    return decorate if fn is None else decorate(fn)


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


def _pending_function(proxy: PromiseProxy) -> Callable[..., Any] | None:
    """The function a pending ``@app.task`` proxy will make its task from, if it holds one.

    ``@app.task`` keeps the function among the arguments of the pending call; the garbage
    collector lists what an object refers to without naming any attribute of Celery's.
    """
    for held in gc.get_referents(proxy):
        if isinstance(held, tuple) and len(held) == 1 and inspect.isfunction(held[0]):
            return held[0]
    return None
