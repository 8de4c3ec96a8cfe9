"""The ``@concurrent`` decorator and :func:`spec_of`.

``@concurrent`` works below ``@app.task`` (the reference's order) and above it; Celery
task options (``@app.task(allow_concurrent_inputs=10)``) work too once the plugin is
installed on the app.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from celery import Celery, Task
from celery.local import PromiseProxy, Proxy

from .asyncbridge import original_async, sync_runner
from .errors import ConfigurationError, DecoratorOrderError
from .spec import OPTION_NAMES, FunctionSpec, normalize_options

F = TypeVar("F", bound=Callable[..., Any])

#: Where the decorator's keywords are kept, on the function or on the task class.
OPTIONS_ATTR = "__celery_concurrent__"
_SPEC_CACHE_ATTR = "_celery_concurrent_spec"
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
    is_async = inspect.iscoroutinefunction(fn)
    normalize_options(options, is_async=is_async)
    wrapped = sync_runner(fn) if is_async else fn
    setattr(wrapped, OPTIONS_ATTR, dict(options))
    _install_on_current_app()
    return wrapped


def _decorate_task(task: Task, options: Mapping[str, Any]) -> None:
    cls = type(task)
    fn = cls.__dict__.get("run")
    raw = fn.__func__ if isinstance(fn, staticmethod) else fn
    is_async = inspect.iscoroutinefunction(raw) or original_async(raw) is not None
    normalize_options(options, is_async=is_async)
    setattr(cls, OPTIONS_ATTR, dict(options))
    if cls.__dict__.get(_SPEC_CACHE_ATTR) is not None:
        delattr(cls, _SPEC_CACHE_ATTR)
    adopt_async_run(task)
    from .plugin import install

    install(task.app)


def _decorate_lazy_task(proxy: PromiseProxy, options: Mapping[str, Any]) -> PromiseProxy:
    # Evaluating the proxy now would bind the task to a configuration that may not be
    # loaded yet, so the task is decorated when Celery evaluates it. The checks that
    # depend on the function (an async one takes no sync pool) still run now.
    fn = _pending_function(proxy)
    if fn is not None:
        is_async = inspect.iscoroutinefunction(fn) or original_async(fn) is not None
        normalize_options(options, is_async=is_async)

    def on_evaluated() -> None:
        _decorate_task(proxy._get_current_object(), options)

    proxy.__then__(on_evaluated)
    _install_on_current_app()
    return proxy


def _pending_function(proxy: PromiseProxy) -> Callable[..., Any] | None:
    """The function a pending ``@app.task`` proxy will make its task from, if known."""
    try:
        args = object.__getattribute__(proxy, "_Proxy__args")
    except AttributeError:
        return None
    return args[0] if args and callable(args[0]) else None


def _install_on_current_app() -> None:
    from celery import _state

    app = _state._tls.current_app or _state.default_app
    if app is not None:
        from .plugin import install

        install(app)


def adopt_async_run(task: Task) -> None:
    """Make an ``async def`` task's ``run`` return its result instead of a coroutine."""
    cls = type(task)
    fn = cls.__dict__.get("run")
    if fn is None:
        return
    if isinstance(fn, staticmethod):
        if inspect.iscoroutinefunction(fn.__func__):
            cls.run = staticmethod(sync_runner(fn.__func__))
    elif inspect.iscoroutinefunction(fn):
        cls.run = sync_runner(fn)


def spec_of(task: Task) -> FunctionSpec | None:
    """The :class:`FunctionSpec` of a task, or ``None`` for a plain Celery task.

    Raises :class:`ConfigurationError` when the task's settings are invalid.
    """
    if isinstance(task, PromiseProxy):
        task = task._get_current_object()
    cls = type(task)
    cached = cls.__dict__.get(_SPEC_CACHE_ATTR)
    if cached is not None:
        return cached
    options = _options_of(task)
    if options is None:
        return None
    run = cls.__dict__.get("run")
    raw = run.__func__ if isinstance(run, staticmethod) else run
    is_async = inspect.iscoroutinefunction(raw) or original_async(raw) is not None
    task_queue = getattr(task, "queue", None)
    own_queue = options.get("queue")
    if own_queue and task_queue and own_queue != task_queue:
        raise ConfigurationError(
            "queue", own_queue, f"the task's own queue option says {task_queue!r}"
        )
    if task_queue and not own_queue:
        options["queue"] = task_queue
    spec = FunctionSpec.from_options(task.name, options, is_async=is_async)
    adopt_async_run(task)
    setattr(cls, _SPEC_CACHE_ATTR, spec)
    return spec


def _options_of(task: Task) -> dict[str, Any] | None:
    from_task = {
        name: getattr(task, name)
        for name in OPTION_NAMES - {"queue"}
        if getattr(task, name, None) is not None
    }
    decorated = getattr(type(task), OPTIONS_ATTR, None) or getattr(task.run, OPTIONS_ATTR, None)
    if decorated is None and not from_task:
        return None
    return {**from_task, **(decorated or {})}


def specs_of(app: Celery) -> dict[str, FunctionSpec]:
    """Every ``@concurrent`` function of ``app``, by task name."""
    out: dict[str, FunctionSpec] = {}
    for name, task in sorted(app.tasks.items()):
        spec = spec_of(task)
        if spec is not None:
            out[name] = spec
    return out
