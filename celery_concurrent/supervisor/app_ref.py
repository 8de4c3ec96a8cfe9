"""Which app a node's containers load: the one the node itself was started with.

A container is a fresh process (forked from the fork server, or exec'd), so it needs an
importable reference to the app. The node knows it: the ``-A`` of its command line. Only
a worker started without a command line (``app.Worker(...)``, ``start_worker`` in tests)
falls back to a search of the imported modules, and the reference it finds is checked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import click
from celery import Celery
from celery.app.utils import find_app

from ..errors import ConfigurationError

#: the setting that names the app's reference when nothing else can
APP_SETTING = "concurrent_app"
#: the environment variable Celery's own ``-A`` reads (``celery`` has the CELERY_ prefix)
APP_ENV = "CELERY_APP"


def app_reference(app: Celery, hints: Iterable[str] = ()) -> str:
    """An importable reference to ``app`` (``proj``, ``proj.celery:app``) for its containers.

    In order: the ``concurrent_app`` setting, the node's ``-A`` (or ``CELERY_APP``), then a
    search of the modules in ``hints`` and every other imported one. Raises
    :class:`ConfigurationError` when the reference found does not load ``app``.
    """
    configured = app.conf.get(APP_SETTING)
    if configured:
        return _checked(app, str(configured), APP_SETTING)
    given = command_line_app()
    if given:
        return _checked(app, given, "-A")
    return _checked(app, locate_app(app, hints), APP_SETTING)


def command_line_app() -> str | None:
    """The ``-A``/``--app`` this process's ``celery`` command was given, if it has one."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        value = ctx.find_root().params.get("app")
        if isinstance(value, str) and value:
            return value
    return os.environ.get(APP_ENV) or None


def _checked(app: Celery, ref: str, source: str) -> str:
    try:
        found = find_app(ref)
    except Exception as exc:  # noqa: BLE001 - any import failure is the same mistake
        raise ConfigurationError(source, ref, f"cannot load the app from it: {exc}") from exc
    if found is not app:
        raise ConfigurationError(
            source,
            ref,
            f"it loads {_describe(found)}, not the node's app {app.main!r}; set "
            f"app.conf.{APP_SETTING} to a 'module:attribute' that names the node's app",
        )
    return ref


def _describe(found: object) -> str:
    return f"the app {found.main!r}" if isinstance(found, Celery) else repr(found)


def locate_app(app: Celery, hints: Iterable[str] = ()) -> str:
    """A ``module:attribute`` that holds ``app``, searched in the imported modules.

    Celery's own modules are never a match: their attributes (the current or the default
    app) are process state, not a reference another process can load.
    """
    hints = list(hints)
    names = [*hints, *[m for m in list(sys.modules) if m not in hints]]
    for modname in names:
        if modname == "__main__" or modname == "celery" or modname.startswith("celery."):
            continue
        module = sys.modules.get(modname)
        try:
            items = list(vars(module).items()) if module is not None else []
        except TypeError:
            continue
        for attr, value in items:
            if value is app:
                return f"{modname}:{attr}"
    raise ConfigurationError(
        APP_SETTING,
        None,
        f"cannot find an importable reference to the app {app.main!r}; start the node "
        f"with 'celery -A <module> worker' or set app.conf.{APP_SETTING} = 'module:attribute'",
    )
