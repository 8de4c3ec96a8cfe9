"""GPUs: what a function asks for, what a node has, and which container holds which.

- **Requests.** ``gpu="any"``, ``gpu="A100"``, ``gpu="H100:2"`` (two devices per
  container) or a list of those, tried in order of preference. Model names are
  case-insensitive.
- **Devices.** A node learns its GPUs from ``nvidia-smi`` (restricted to
  ``CUDA_VISIBLE_DEVICES`` when that is set), unless ``celery worker --gpus "0:A100,1:A100"``
  or ``CELERY_CONCURRENT_GPUS`` in the same format says otherwise; an empty value means
  no GPUs.
- **Placement.** A pure allocator gives each container devices of its own, trying the
  function's fallbacks in order, and takes them back when the container exits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from celery.utils.log import get_logger

from .errors import ConfigurationError, GpuSpecError

logger = get_logger(__name__)

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


# -- the node's devices -------------------------------------------------------------------

#: the environment variable that overrides detection, in the format of ``--gpus``
GPUS_ENV = "CELERY_CONCURRENT_GPUS"
GPUS_OPTION = "--gpus"
#: ``uuid`` comes last so that ``CUDA_VISIBLE_DEVICES=GPU-...`` can be honoured too
DETECT_COMMAND = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,uuid",
    "--format=csv,noheader",
)
DETECT_TIMEOUT_SECONDS = 10.0

_OVERRIDE_ENTRY = re.compile(r"^(?P<id>[A-Za-z0-9_\-]+)\s*:\s*(?P<name>[A-Za-z0-9][\w .\-]*)$")


@dataclass(frozen=True)
class GpuDevice:
    """One GPU of the node.

    Parameters
    ----------
    id:
        What a container's ``CUDA_VISIBLE_DEVICES`` names it by: the ``nvidia-smi`` index
        (containers run with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, the order nvidia-smi uses).
    name:
        The model as the driver reports it, e.g. ``"NVIDIA A100-SXM4-80GB"``.
    memory_mib:
        Total memory, when known.
    uuid:
        The driver's ``GPU-...`` identifier, when known.
    """

    id: str
    name: str
    memory_mib: int | None = None
    uuid: str | None = None

    def __str__(self) -> str:
        return f"{self.id}:{self.name}"


def parse_gpu_override(value: str, parameter: str = GPUS_OPTION) -> tuple[GpuDevice, ...]:
    """Parse ``"0:A100,1:A100"`` (``--gpus`` or ``CELERY_CONCURRENT_GPUS``) into devices.

    An empty or blank value means the node has no GPUs. Raises
    :class:`ConfigurationError` naming ``parameter`` and the value when it is malformed.
    """
    if not isinstance(value, str):
        raise ConfigurationError(parameter, value, 'expected a string such as "0:A100,1:A100"')
    if not value.strip():
        return ()
    devices: list[GpuDevice] = []
    for entry in value.split(","):
        match = _OVERRIDE_ENTRY.match(entry.strip())
        if match is None:
            raise ConfigurationError(
                parameter,
                value,
                f'{entry.strip()!r} is not of the form "INDEX:MODEL" '
                '(e.g. "0:A100,1:A100"; an empty value means no GPUs)',
            )
        device = GpuDevice(id=match.group("id"), name=match.group("name").strip())
        if any(d.id == device.id for d in devices):
            raise ConfigurationError(parameter, value, f"device {device.id!r} is listed twice")
        devices.append(device)
    return tuple(devices)


def parse_nvidia_smi(output: str) -> tuple[GpuDevice, ...]:
    """Devices from ``nvidia-smi --query-gpu=index,name,memory.total[,uuid] --format=csv,noheader``.

    Lines that do not parse are skipped (and logged), so one odd line does not hide the
    node's other devices.
    """
    devices: list[GpuDevice] = []
    for line in output.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if fields == [""]:
            continue
        if len(fields) < 3 or not fields[0].isdigit() or not fields[1]:
            logger.warning("celery-concurrent: ignoring an unexpected nvidia-smi line: %r", line)
            continue
        memory = fields[2].split()[0] if fields[2] else ""
        uuid = fields[3] if len(fields) > 3 and fields[3] else None
        devices.append(
            GpuDevice(
                id=fields[0],
                name=fields[1],
                memory_mib=int(memory) if memory.isdigit() else None,
                uuid=uuid,
            )
        )
    return tuple(devices)


def restrict_to_visible(
    devices: Sequence[GpuDevice], cuda_visible_devices: str | None
) -> tuple[GpuDevice, ...]:
    """The devices ``CUDA_VISIBLE_DEVICES`` lets the node use, in the order it lists them.

    Unset means all of them; empty means none. As in CUDA, entries are indices or
    ``GPU-`` UUID prefixes, and the first entry that names no device ends the list.
    """
    if cuda_visible_devices is None:
        return tuple(devices)
    visible: list[GpuDevice] = []
    for entry in cuda_visible_devices.split(","):
        found = _find_device(devices, entry.strip())
        if found is None:
            break
        if found not in visible:
            visible.append(found)
    return tuple(visible)


def _find_device(devices: Sequence[GpuDevice], entry: str) -> GpuDevice | None:
    if entry.isascii() and entry.isdigit():
        return next((d for d in devices if d.id.isdigit() and int(d.id) == int(entry)), None)
    if entry.lower().startswith("gpu-"):
        prefix = entry.lower()
        return next((d for d in devices if d.uuid and d.uuid.lower().startswith(prefix)), None)
    return None


def run_nvidia_smi() -> str | None:
    """The output of :data:`DETECT_COMMAND`, or ``None`` when there is no usable nvidia-smi."""
    if shutil.which(DETECT_COMMAND[0]) is None:
        return None
    try:
        done = subprocess.run(
            DETECT_COMMAND,
            capture_output=True,
            text=True,
            timeout=DETECT_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("celery-concurrent: cannot run nvidia-smi: %s", exc)
        return None
    if done.returncode != 0:
        # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the driver"
        logger.warning(
            "celery-concurrent: nvidia-smi failed (exit status %s): %s",
            done.returncode,
            (done.stderr or done.stdout).strip()[:500],
        )
        return None
    return done.stdout


def detect_gpus(
    environ: Mapping[str, str] = os.environ,
    run: Callable[[], str | None] = run_nvidia_smi,
) -> tuple[GpuDevice, ...]:
    """The node's GPUs as ``nvidia-smi`` reports them, restricted to ``CUDA_VISIBLE_DEVICES``."""
    output = run()
    if output is None:
        return ()
    return restrict_to_visible(parse_nvidia_smi(output), environ.get("CUDA_VISIBLE_DEVICES"))


def gpu_override(
    option: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[GpuDevice, ...] | None:
    """The devices ``--gpus`` (first) or ``CELERY_CONCURRENT_GPUS`` names; ``None`` if neither.

    Raises :class:`ConfigurationError` naming the option or variable when it is malformed.
    """
    if option is not None:
        return parse_gpu_override(option, GPUS_OPTION)
    if GPUS_ENV in environ:
        return parse_gpu_override(environ[GPUS_ENV], GPUS_ENV)
    return None


def node_gpus(
    option: str | None,
    environ: Mapping[str, str] = os.environ,
    detect: Callable[[], tuple[GpuDevice, ...]] | None = None,
) -> tuple[GpuDevice, ...]:
    """The node's GPUs: the override when one is set, else what detection finds."""
    override = gpu_override(option, environ)
    if override is not None:
        return override
    return detect() if detect is not None else detect_gpus(environ)


# -- placement ----------------------------------------------------------------------------

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
