"""``python -m examples.gpu_embeddings [--gpus "0:A100,1:A100"]``: GPU routing, shown.

It starts two nodes: ``gpu@host`` with the machine's GPUs (found with nvidia-smi, or
simulated with ``--gpus`` / ``CELERY_CONCURRENT_GPUS``) and ``cpu@host`` with none. The
``embed`` inputs travel on the function's GPU queue; only the GPU node starts containers
for them, each holding a device of its own (its ``CUDA_VISIBLE_DEVICES``). The CPU node
never takes one. With torch installed and a real GPU, the vectors are computed on it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter
from typing import Any

from celery import group

from celery_concurrent import spec_of
from celery_concurrent.errors import ConfigurationError
from celery_concurrent.supervisor.gpus import GPUS_ENV, GpuDevice, detect_gpus, gpu_override
from examples.harness import (
    Stack,
    example_parser,
    format_table,
    results_of,
    run_in_stack,
    status_rows,
)

from .model import cosine

APP = "examples.gpu_embeddings.app"
#: what main() returns where there is no GPU to run on
NEEDS_GPU_EXIT = 2
TEXTS = [
    "the cat sat on the mat",
    "a cat sat on a mat",
    "stock prices fell sharply today",
    "markets dropped as stock prices fell",
]


def main(argv: list[str] | None = None) -> int:
    parser = example_parser("python -m examples.gpu_embeddings", __doc__, "16 inputs")
    parser.add_argument(
        "--gpus",
        default=None,
        help=f'simulate the GPU node\'s devices, e.g. "0:A100,1:A100" (or set {GPUS_ENV})',
    )
    parser.add_argument("--batches", type=int, default=32, help="inputs of 4 texts to send")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches = 16
    try:
        override = gpu_override(args.gpus)
    except ConfigurationError as exc:
        parser.error(str(exc))
    devices = override if override is not None else detect_gpus()
    if not devices:
        print(needs_a_gpu(simulated=override is not None), file=sys.stderr)
        return NEEDS_GPU_EXIT
    simulate = args.gpus if args.gpus is not None else os.environ.get(GPUS_ENV)

    def body(stack: Stack) -> int:
        found = run(stack, devices, simulate if override is not None else None, args.batches)
        if args.json:
            print(json.dumps(found, default=str))
        return 0

    return run_in_stack(APP, body)


def needs_a_gpu(simulated: bool) -> str:
    why = "the simulated node has no devices" if simulated else "nvidia-smi finds no GPU here"
    return (
        f'{APP}.embed asks for gpu="any": only a node with a GPU runs it, and this machine has\n'
        f"none ({why}). Run this example on a GPU node, or simulate one:\n\n"
        f'    python -m examples.gpu_embeddings --gpus "0:A100,1:A100"\n'
    )


def run(
    stack: Stack, devices: tuple[GpuDevice, ...], simulate: str | None, batches: int
) -> dict[str, Any]:
    from .app import app, embed

    host = socket.gethostname()
    spec = spec_of(embed)
    assert spec is not None
    print(stack.describe())
    where = f"simulated with --gpus {simulate!r}" if simulate else "found with nvidia-smi"
    print(f"gpu@{host}: {', '.join(map(str, devices))} ({where});  cpu@{host}: no GPU")
    print(f"embed (gpu={spec.as_dict()['gpu']}) inputs travel on the queue {spec.queue}\n")
    stack.purge(app)
    gpu_args = ("--gpus", simulate) if simulate else ()
    gpu_node = stack.start_node("-n", "gpu@%h", "-c", "1", *gpu_args, wait=False)
    cpu_node = stack.start_node("-n", "cpu@%h", "-c", "1", "--gpus", "", wait=False)
    stack.wait_ready(gpu_node)
    stack.wait_ready(cpu_node)

    texts = [TEXTS[i % len(TEXTS) :] + TEXTS[: i % len(TEXTS)] for i in range(batches)]
    answers = results_of(group(embed.s(batch) for batch in texts).apply_async())
    row = next(iter(status_rows(app, timeout=1.0)), {})

    served = Counter((a["container"], a["cuda_visible_devices"], a["device"]) for a in answers)
    print(
        format_table(
            ("CONTAINER", "CUDA_VISIBLE_DEVICES", "COMPUTED ON", "INPUTS"),
            ((c, d, on, n) for (c, d, on), n in sorted(served.items())),
        )
    )
    on_cpu_node = sum(n for (c, _, _), n in served.items() if "-cpu-" in c)
    vectors = answers[0]["vectors"]
    print(
        f'\ncpu@{host} ran {on_cpu_node} inputs: it cannot place gpu="any" and never consumes '
        f"{spec.queue}.\n"
        f"status: {row.get('containers', '?')} containers over {len(row.get('nodes', []))} "
        f"nodes, devices {row.get('gpu_devices', {})}\n"
        f"similar texts: {cosine(vectors[0], vectors[1]):.2f}; "
        f"unrelated: {cosine(vectors[0], vectors[2]):.2f}"
    )
    return {
        "devices": [str(d) for d in devices],
        "queue": spec.queue,
        "answers": [{k: v for k, v in a.items() if k != "vectors"} for a in answers],
        "status": row,
    }


if __name__ == "__main__":
    sys.exit(main())
