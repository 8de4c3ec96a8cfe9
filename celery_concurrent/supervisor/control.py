"""Remote control commands: ``concurrent_status`` and ``concurrent_update``.

They run on the node's main process, next to its supervisor, and change nothing
unless their arguments validate.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from ..errors import ConcurrentError
from ..spec import RUNTIME_BOUND_NAMES


def _supervisor(state: Any) -> Any:
    controller = getattr(state.consumer, "controller", None)
    return getattr(controller, "concurrent_supervisor", None)


@inspect_command(name="concurrent_status")
def concurrent_status(state: Any) -> dict[str, Any]:
    """The node's @concurrent function pools."""
    supervisor = _supervisor(state)
    if supervisor is None:
        return {"functions": []}
    return {"functions": supervisor.status()}


@control_command(
    name="concurrent_update",
    args=[("function", str), ("bounds", dict)],
    signature="<function> <bounds>",
)
def concurrent_update(
    state: Any, function: str, bounds: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Change the bounds of a running function; they apply at once."""
    supervisor = _supervisor(state)
    if supervisor is None:
        return {"skip": "this node runs no celery-concurrent supervisor"}
    # Anyone who can publish to the broker can send this: check the shapes first.
    if not isinstance(function, str):
        return {"error": f"function={function!r}: expected a task name"}
    if bounds is not None and not isinstance(bounds, dict):
        return {"error": f"bounds={bounds!r}: expected a mapping of bound names to values"}
    bounds = dict(bounds or {})
    unknown = sorted(set(bounds) - RUNTIME_BOUND_NAMES)
    if not bounds:
        return {"error": "no bounds given"}
    if unknown:
        return {"error": f"{unknown[0]}={bounds[unknown[0]]!r}: cannot be changed at runtime"}
    if function not in supervisor.pools:
        return {"skip": f"{function!r} is not supervised on this node"}
    try:
        spec = supervisor.update(function, **bounds)
    except ConcurrentError as exc:
        return {"error": str(exc)}
    return {"ok": spec.as_dict()}
