"""The real-GPU check: detection, placement and one device set per container, with torch.

Run it on a machine with NVIDIA GPUs, from the repository root::

    python -m benchmarks.gpu_check [--out gpu_check.json]

It starts a private Redis and one node, ``celery -A benchmarks.gpu_check worker``, with
no ``--gpus`` and no ``CELERY_CONCURRENT_GPUS``: the node finds its GPUs with
``nvidia-smi`` (within ``CUDA_VISIBLE_DEVICES``, if set). The function :func:`matmul`
(``gpu="any"``, ``allow_concurrent_inputs=4``) runs small torch matrix products on the
device its container was given, several inputs at once, and reports what it saw:
``CUDA_VISIBLE_DEVICES``, ``torch.cuda.device_count()``, the device's name and UUID.

The report (JSON, on stdout and in ``--out``) lists the devices each container saw. The
check fails (exit status 1) if a container saw more than one device, a device other than
the one the node says it gave it, or one that another container also had; or if more
containers than devices ran at once.

Where there is nothing to check it says so plainly and claims nothing: exit status 3
when the machine has no GPU (no ``nvidia-smi``, or it lists none), 4 when torch is not
installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery, Task, group

from celery_concurrent import concurrent
from celery_concurrent.supervisor.gpus import GPUS_ENV, detect_gpus

APP = "benchmarks.gpu_check"
FUNCTION = f"{APP}.matmul"
NODE = "gpucheck@%h"
INPUTS_PER_CONTAINER = 4
NO_GPU_EXIT = 3
NO_TORCH_EXIT = 4

app = Celery("gpu_check", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(bind=True)
@concurrent(gpu="any", allow_concurrent_inputs=INPUTS_PER_CONTAINER, container_idle_timeout=30)
def matmul(self: Task, size: int = 2048, rounds: int = 50) -> dict[str, Any]:
    """A few matrix products on the container's GPU, and what the container saw."""
    # Imported here, not at module level: the node's fork server imports this module,
    # and CUDA must not be initialised in a process that containers are forked from.
    import torch

    started = time.monotonic()
    device = torch.device("cuda", 0)
    x = torch.randn(size, size, device=device)
    for _ in range(rounds):
        x = torch.tanh(x @ x / size**0.5)
    torch.cuda.synchronize(device)
    props = torch.cuda.get_device_properties(device)
    return {
        "container": self.request.hostname,
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_count": torch.cuda.device_count(),
        "device_name": torch.cuda.get_device_name(device),
        "device_uuid": str(getattr(props, "uuid", "") or "") or None,
        "seconds": round(time.monotonic() - started, 3),
    }


def _say(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def _same_uuid(detected: str | None, seen: str | None) -> bool | None:
    """Whether nvidia-smi's and torch's UUIDs name one device (``None``: one is unknown)."""
    if not detected or not seen:
        return None
    return detected.lower().removeprefix("gpu-") == seen.lower().removeprefix("gpu-")


def analyse(
    answers: list[dict[str, Any]], given: dict[str, list[str]], detected: dict[str, Any]
) -> list[str]:
    """What went wrong, from the inputs' answers and the devices the node says it gave."""
    problems = []
    seen_by: dict[str, set[str | None]] = defaultdict(set)
    for answer in answers:
        seen_by[answer["container"]].add(answer["cuda_visible_devices"])
        if answer["device_count"] != 1:
            problems.append(f"{answer['container']} saw {answer['device_count']} devices")
    owners: dict[str, str] = {}
    for container, seen in sorted(seen_by.items()):
        if len(seen) != 1 or None in seen:
            problems.append(f"{container} saw CUDA_VISIBLE_DEVICES {sorted(map(str, seen))}")
            continue
        (visible,) = seen
        assert visible is not None
        if container in given and given[container] != visible.split(","):
            problems.append(f"{container} saw {visible}, the node gave it {given[container]}")
        for device in visible.split(","):
            if device in owners:
                problems.append(f"device {device}: both {owners[device]} and {container}")
            owners[device] = container
    for answer in answers:
        device = detected.get(answer["cuda_visible_devices"] or "")
        if device is None:
            continue
        if _same_uuid(device["uuid"], answer["device_uuid"]) is False:
            problems.append(
                f"{answer['container']} was given device {answer['cuda_visible_devices']} "
                f"({device['uuid']}) but torch ran on {answer['device_uuid']}"
            )
    return sorted(set(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--rounds", type=int, default=3, help="inputs per slot")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the inputs")
    args = parser.parse_args(argv)

    # The check is of detection: neither override may be in the way.
    os.environ.pop(GPUS_ENV, None)
    devices = detect_gpus()
    if not devices:
        _say(
            "NO GPU: nvidia-smi is not on PATH or lists no device (within "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            "Nothing was checked; run this on a machine with an NVIDIA GPU."
        )
        return NO_GPU_EXIT
    if importlib.util.find_spec("torch") is None:
        _say("torch is not installed; nothing was checked (pip install torch).")
        return NO_TORCH_EXIT
    _say(f"detected {len(devices)} GPU(s): {', '.join(map(str, devices))}")

    report = check(devices, len(devices) * INPUTS_PER_CONTAINER * args.rounds, args.timeout)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    _say("OK" if report["ok"] else f"FAILED: {'; '.join(report['problems'])}")
    return 0 if report["ok"] else 1


def check(devices: Sequence[Any], inputs: int, timeout: float) -> dict[str, Any]:
    """Run ``inputs`` on a node of this machine's GPUs; the report of what each saw."""
    from devkit.servers import RedisServer
    from devkit.workers import Workers

    redis_server = RedisServer()
    logdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["CELERY_BROKER_URL"] = redis_server.url
    app.conf.broker_url = app.conf.result_backend = redis_server.url
    try:
        with Workers(redis_server.url, logdir) as workers:
            redis_server.start()
            args = ("-c", "1", "-n", NODE, "--concurrent-functions", FUNCTION)
            node = workers.start(APP, *args, ready_timeout=120)
            started = time.monotonic()
            answers, given, most = run_inputs(workers, node, inputs, timeout)
            detected = {d.id: {"name": d.name, "uuid": d.uuid} for d in devices}
            problems = analyse(answers, given, detected)
            if most > len(devices):
                problems.append(f"{most} containers at once on {len(devices)} GPU(s)")
            return {
                "detected": [str(d) for d in devices],
                "inputs": inputs,
                "seconds": round(time.monotonic() - started, 2),
                "most_containers_at_once": most,
                "containers": containers_seen(answers, given),
                "problems": problems,
                "ok": not problems,
                "node_log_tail": workers.tail(node, 2000),
            }
    finally:
        redis_server.stop()
        shutil.rmtree(logdir, ignore_errors=True)


def run_inputs(
    workers: Any, node: Any, inputs: int, timeout: float
) -> tuple[list[dict[str, Any]], dict[str, list[str]], int]:
    """Send the inputs and watch the node's status meanwhile: the inputs' answers, the
    devices the node gave each container, and the most containers it ran at once."""
    from celery_concurrent.cli import collect_status

    started = time.monotonic()
    result = group(matmul.s() for _ in range(inputs)).apply_async()
    given: dict[str, list[str]] = {}
    most = 0

    def read_status() -> bool:
        """Note what the node says; whether it answered."""
        nonlocal most
        for row in collect_status(app, timeout=1.0):
            if row["function"] == FUNCTION and row["nodes"]:
                most = max(most, row["containers"] + row["retiring"])
                given.update(row.get("gpu_devices") or {})
                return True
        return False

    while not result.ready():
        read_status()
        if node.poll() is not None:
            raise RuntimeError(f"the node exited:\n{workers.tail(node)}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(
                f"the inputs did not finish within {timeout:g} s:\n{workers.tail(node)}"
            )
    answers = result.get(timeout=60)
    # The containers are still warm (container_idle_timeout=30): ask what they hold.
    for _ in range(5):
        if read_status():
            break
    return answers, given, most


def containers_seen(
    answers: list[dict[str, Any]], given: dict[str, list[str]]
) -> dict[str, dict[str, Any]]:
    """Per container: the devices it was given and saw, and how many inputs it ran."""
    containers: dict[str, dict[str, Any]] = {}
    for answer in answers:
        entry = containers.setdefault(
            answer["container"],
            {
                "given": given.get(answer["container"]),
                "cuda_visible_devices": answer["cuda_visible_devices"],
                "device_count": answer["device_count"],
                "device_name": answer["device_name"],
                "device_uuid": answer["device_uuid"],
                "inputs": 0,
            },
        )
        entry["inputs"] += 1
    return containers


if __name__ == "__main__":
    # Run main() of the module under its importable name: the task must be
    # benchmarks.gpu_check.matmul here as in the node, not __main__.matmul.
    # A SIGTERM (from `timeout`, say) or Ctrl-C still stops the node and Redis in `finally`.
    from benchmarks.gpu_check import main as checked_main
    from benchmarks.scenario import run_main

    sys.exit(run_main(checked_main))
