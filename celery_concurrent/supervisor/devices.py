"""Which container holds which of the node's GPUs.

A pure allocator gives each container devices of its own, trying the function's
fallbacks in order, and takes them back when the container exits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..gpu import ANY, GpuRequest
from ..spec import FunctionSpec
from .gpus import GpuDevice

#: set in every GPU container, so that the indices it is given mean what nvidia-smi means
CUDA_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def model_matches(model: str, device_name: str) -> bool:
    """Whether a requested model (``"A100"``, ``"any"``) matches a device's name.

    Case-insensitive. Every word of the model must appear in the device's name, in
    order, as a whole word or a run of adjacent ones: ``"A100"`` and ``"A100-80GB"``
    match ``"NVIDIA A100-SXM4-80GB"``, ``"RTX4090"`` matches ``"NVIDIA GeForce RTX 4090"``;
    ``"A10"`` does not match an A100, nor ``"L4"`` an L40S.
    """
    if model.upper() == ANY:
        return True
    wanted = _words(model)
    have = _words(device_name)
    start = 0
    for word in wanted:
        end = _find_run(have, word, start)
        if end is None:
            return False
        start = end
    return bool(wanted)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", text.upper())


def _find_run(words: list[str], word: str, start: int) -> int | None:
    """The index after the first run of ``words[start:]`` that spells ``word``, if any."""
    for first in range(start, len(words)):
        spelled = ""
        for last in range(first, len(words)):
            spelled += words[last]
            if spelled == word:
                return last + 1
            if not word.startswith(spelled):
                break
    return None


@dataclass(frozen=True)
class Placement:
    """The devices one container holds, and the request they satisfy."""

    request: GpuRequest
    devices: tuple[GpuDevice, ...]

    @property
    def visible_devices(self) -> str:
        """The container's ``CUDA_VISIBLE_DEVICES``."""
        return ",".join(d.id for d in self.devices)

    def environ(self) -> dict[str, str]:
        """What the container's environment gets before any user code runs."""
        return {**CUDA_ENV, "CUDA_VISIBLE_DEVICES": self.visible_devices}


def place(requests: Sequence[GpuRequest], free: Sequence[GpuDevice]) -> Placement | None:
    """Devices for one container: the first request, in order, that the free devices satisfy.

    The devices of one container are all of one model (one name), so a two-device
    request never mixes, say, a 40 GB and an 80 GB card.
    """
    for request in requests:
        by_name: dict[str, list[GpuDevice]] = {}
        for device in free:
            if model_matches(request.model, device.name):
                by_name.setdefault(device.name, []).append(device)
        for same_model in by_name.values():
            if len(same_model) >= request.count:
                return Placement(request, tuple(same_model[: request.count]))
    return None


def placeable_count(requests: Sequence[GpuRequest], free: Sequence[GpuDevice]) -> int:
    """How many more containers the free devices can hold, placing them one by one."""
    remaining = list(free)
    count = 0
    while (placement := place(requests, remaining)) is not None:
        remaining = [d for d in remaining if d not in placement.devices]
        count += 1
    return count


class DeviceAllocator:
    """Which of the node's devices each container holds; no device is ever held twice.

    Pure bookkeeping, keyed by container ident: the supervisor allocates before it starts
    a container and releases when the container has exited (retired or crashed).
    """

    def __init__(self, devices: Iterable[GpuDevice] = ()) -> None:
        self.devices = tuple(devices)
        self._held: dict[str, Placement] = {}

    @property
    def free(self) -> tuple[GpuDevice, ...]:
        held = {d for placement in self._held.values() for d in placement.devices}
        return tuple(d for d in self.devices if d not in held)

    def can_place(self, requests: Sequence[GpuRequest]) -> bool:
        """Whether the node could hold one container of these requests with every device free."""
        return place(requests, self.devices) is not None

    def placeable(self, spec: FunctionSpec) -> bool:
        """Whether the node could ever run a container of ``spec`` (any CPU function can)."""
        return spec.gpu is None or self.can_place(spec.gpu)

    def capacity(self, requests: Sequence[GpuRequest]) -> int:
        """How many more containers of these requests the free devices can hold."""
        return placeable_count(requests, self.free)

    def allocate(self, owner: str, requests: Sequence[GpuRequest]) -> Placement | None:
        """Give ``owner`` free devices for the first request they satisfy, or ``None``."""
        if owner in self._held:
            raise ValueError(f"{owner!r} already holds devices")
        placement = place(requests, self.free)
        if placement is not None:
            self._held[owner] = placement
        return placement

    def release(self, owner: str) -> Placement | None:
        """Take back what ``owner`` held (nothing if it held nothing)."""
        return self._held.pop(owner, None)

    def held(self, owner: str) -> Placement | None:
        return self._held.get(owner)
