"""The node's GPUs: detected with ``nvidia-smi``, or named by ``--gpus``.

A node learns its GPUs from ``nvidia-smi`` (restricted to ``CUDA_VISIBLE_DEVICES`` when
that is set), unless ``celery worker --gpus "0:A100,1:A100"`` or
``CELERY_CONCURRENT_GPUS`` in the same format says otherwise; an empty value means no
GPUs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from celery.utils.log import get_logger

from ..constants import GPU_DETECT_TIMEOUT
from ..errors import ConfigurationError

logger = get_logger(__name__)

#: the environment variable that overrides detection, in the format of ``--gpus``
GPUS_ENV = "CELERY_CONCURRENT_GPUS"
GPUS_OPTION = "--gpus"
#: ``uuid`` comes last so that ``CUDA_VISIBLE_DEVICES=GPU-...`` can be honoured too
DETECT_COMMAND = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,uuid",
    "--format=csv,noheader",
)

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
            timeout=GPU_DETECT_TIMEOUT,
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
