"""``python -m examples.existing_project``: the same calls before and after the decorator.

Each project runs under the same command, ``celery -A <module> worker -c 2``: before, the
slow task shares the worker's two processes; after, it gets containers of its own.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from celery import group

from examples.harness import ExampleError, Stack, example_parser, report, results_of, run_in_stack

MODULES = ("examples.existing_project.before", "examples.existing_project.after")
WHERE = {
    "before": "the worker's own pool: 2 processes, one call each",
    "after": "containers of its own: 20 calls at once each, up to 4",
}


def main(argv: list[str] | None = None) -> int:
    parser = example_parser("python -m examples.existing_project", __doc__, "12 calls")
    parser.add_argument("--orders", type=int, default=40, help="quote_shipping calls per project")
    args = parser.parse_args(argv)
    if args.quick:
        args.orders = 12

    def body(stack: Stack) -> int:
        rows = [run(stack, module, args.orders) for module in MODULES]
        return report(
            ("PROJECT", "QUOTE_SHIPPING RUNS ON", "CALLS", "WALL", "CALLS/S", "SEND_RECEIPT"),
            (
                (
                    r["project"],
                    WHERE[r["project"]],
                    r["calls"],
                    f"{r['wall_s']:.2f} s",
                    f"{r['calls_per_s']:.0f}",
                    r["receipt"],
                )
                for r in rows
            ),
            rows,
            args.json,
        )

    return run_in_stack(MODULES[0], body)


def run(stack: Stack, module: str, orders: int) -> dict[str, Any]:
    import importlib

    project = importlib.import_module(module)
    name = module.rsplit(".", 1)[1]
    print(f"{name}: celery -A {module} worker -c 2")
    stack.purge(project.app)
    node = stack.start_node("-c", "2", app=module)
    started = time.monotonic()
    quotes = results_of(group(project.quote_shipping.s(i) for i in range(orders)).apply_async())
    wall = time.monotonic() - started
    if quotes != [round(4.99 + i % 7, 2) for i in range(orders)]:
        raise ExampleError(f"{name}: wrong quotes {quotes[:5]}...")
    receipt = project.send_receipt.delay(1).get(timeout=30)
    stack.stop_node(node)  # both projects use the default queue for send_receipt
    return {
        "project": name,
        "calls": orders,
        "wall_s": wall,
        "calls_per_s": orders / wall,
        "receipt": receipt,
        "queue": project.app.amqp.router.route({}, project.quote_shipping.name)["queue"].name,
    }


if __name__ == "__main__":
    sys.exit(main())
