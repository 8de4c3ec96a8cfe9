"""What a function asks of GPUs: ``gpu="any"``, ``"A100"``, ``"H100:2"`` or fallbacks.

``gpu="H100:2"`` asks for two devices per container; a list is tried in order of
preference. Model names are case-insensitive. What a node has is the supervisor's
business (``supervisor/gpus.py``), and so is which container holds which device
(``supervisor/devices.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import GpuSpecError

ANY = "ANY"
_SHAPE = re.compile(r"^(?P<model>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?::(?P<count>[^:]*))?$")


@dataclass(frozen=True)
class GpuRequest:
    """One acceptable device shape: ``count`` devices of ``model`` (``"ANY"`` for any model)."""

    model: str
    count: int = 1

    def __str__(self) -> str:
        model = "any" if self.model == ANY else self.model
        return model if self.count == 1 else f"{model}:{self.count}"


def parse_gpu(value: object, parameter: str = "gpu") -> tuple[GpuRequest, ...] | None:
    """Parse a ``gpu=`` value into requests in order of preference, or ``None`` for CPU.

    Raises :class:`GpuSpecError` naming the parameter and the value on a bad count, an
    unknown shape or an empty list.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (_parse_one(value, value, parameter),)
    if isinstance(value, Sequence):
        if not value:
            raise GpuSpecError(parameter, value, "an empty list of GPU fallbacks")
        requests = tuple(_parse_one(item, value, parameter) for item in value)
        if len(set(requests)) != len(requests):
            raise GpuSpecError(parameter, value, "the same GPU shape is listed twice")
        return requests
    raise GpuSpecError(parameter, value, 'expected a string such as "A100" or "H100:2", or a list')


def _parse_one(item: object, whole: object, parameter: str) -> GpuRequest:
    if not isinstance(item, str):
        raise GpuSpecError(parameter, whole, f"{item!r} is not a string")
    match = _SHAPE.match(item.strip())
    if match is None:
        raise GpuSpecError(
            parameter, whole, f'{item!r} is not of the form "MODEL" or "MODEL:COUNT"'
        )
    count_text = match.group("count")
    count = 1
    if count_text is not None:
        # isdigit() alone accepts digits int() rejects, such as "²".
        if not (count_text.isascii() and count_text.isdigit()):
            raise GpuSpecError(parameter, whole, f"the count in {item!r} is not a whole number")
        count = int(count_text)
        if count < 1:
            raise GpuSpecError(parameter, whole, f"the count in {item!r} must be at least 1")
    return GpuRequest(model=match.group("model").upper(), count=count)


def describe_requests(requests: Sequence[GpuRequest]) -> str:
    """``"an H100"``, ``"2 A100s"``, ``"any GPU"``, fallbacks joined by ``"or"``."""
    return " or ".join(_describe(request) for request in requests)


def _describe(request: GpuRequest) -> str:
    if request.model == ANY:
        return "any GPU" if request.count == 1 else f"{request.count} GPUs"
    if request.count > 1:
        return f"{request.count} {request.model}s"
    # The article follows how the first letter is spoken: "an H100", "a T4".
    article = "an" if request.model[0] in "AEFHILMNORSX8" else "a"
    return f"{article} {request.model}"


def unplaceable_reason(requests: Sequence[GpuRequest]) -> str:
    """The status error of a GPU function that no node can place."""
    return f"unplaceable: no node has {describe_requests(requests)}"
