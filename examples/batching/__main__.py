"""``python -m examples.batching``: throughput rising with ``allow_concurrent_inputs``,
and with ``@batched``.

The same prompts go to ``generate_1``, ``generate_8`` and ``generate_32`` (one container
each, continuous batching over the inputs a container runs at once) and to
``generate_batched`` (``@batched(max_batch_size=32)``: one call for the prompts that
arrived together). A model step costs the same for 1 or 32 sequences, so the more
sequences share each step, the more tokens a second.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from celery import group

from celery_concurrent import spec_of
from examples.harness import (
    ExampleError,
    Stack,
    example_parser,
    report,
    results_of,
    run_in_stack,
    wait_for_containers,
)

from .batcher import MAX_BATCH, STEP_SECONDS

APP = "examples.batching.app"


def main(argv: list[str] | None = None) -> int:
    parser = example_parser("python -m examples.batching", __doc__, "16 prompts of 8 tokens")
    parser.add_argument("--inputs", type=int, default=32, help="prompts per function")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per completion")
    args = parser.parse_args(argv)
    if args.quick:
        # Eight tokens, not fewer: the decode rounds, which batching saves, must outweigh
        # the container's intake of the prompts, which it cannot, even on a loaded machine.
        args.inputs, args.tokens = 16, 8

    def body(stack: Stack) -> int:
        rows = run(stack, args.inputs, args.tokens)
        return report(
            (
                "FUNCTION",
                "ALLOW_CONCURRENT_INPUTS",
                "MAX_BATCH_SIZE",
                "INPUTS",
                "WALL",
                "INPUTS/S",
                "TOKENS/S",
                "MEAN BATCH",
            ),
            (
                (
                    r["function"].rsplit(".", 1)[1],
                    r["allow_concurrent_inputs"],
                    r["max_batch_size"] or "-",
                    r["inputs"],
                    f"{r['wall_s']:.2f} s",
                    f"{r['inputs_per_s']:.1f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['mean_batch']:.1f}",
                )
                for r in rows
            ),
            rows,
            args.json,
        )

    return run_in_stack(APP, body)


def run(stack: Stack, inputs: int, tokens: int) -> list[dict[str, Any]]:
    from .app import app, generate_1, generate_8, generate_32, generate_batched

    functions = (generate_1, generate_8, generate_32, generate_batched)
    print(stack.describe())
    stack.purge(app)
    stack.start_node()
    wait_for_containers(app, {task.name: 1 for task in functions})
    print(
        f"{inputs} prompts x {tokens} tokens to each function; a model step takes "
        f"{STEP_SECONDS * 1000:.0f} ms for a batch of 1 to {MAX_BATCH}:\n"
    )
    rows = []
    for task in functions:
        started = time.monotonic()
        prompts = group(task.s(f"prompt {i}", tokens) for i in range(inputs))
        completions = results_of(prompts.apply_async())
        wall = time.monotonic() - started
        if any(c["tokens"] != tokens for c in completions):
            raise ExampleError(f"{task.name} returned short completions")
        spec = spec_of(task)
        assert spec is not None
        rows.append(
            {
                "function": task.name,
                "allow_concurrent_inputs": spec.max_inputs,
                "max_batch_size": spec.max_batch_size,
                "inputs": inputs,
                "wall_s": wall,
                "inputs_per_s": inputs / wall,
                "tokens_per_s": inputs * tokens / wall,
                "mean_batch": sum(c["mean_batch"] for c in completions) / inputs,
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
