"""Soak: 50,000 inputs through repeated scale-up and scale-down, with nothing lost or leaked.

Slow (a few minutes per broker): excluded from ``make test``, run by ``make soak``. It
prints its figures (inputs per second, the node's RSS and open file descriptors).
"""

from __future__ import annotations

import time

import psutil
import pytest

from .support import descendants, row, rss_bytes, wait_for

APP = "tests.apps.faults"
SOAK = f"{APP}.soak"
CYCLES = 10
PER_CYCLE = 5_000


def send(faults, count: int) -> None:
    task = faults.app.soak
    with faults.app.app.producer_or_acquire() as producer:
        for _ in range(count):
            task.apply_async(("soak",), producer=producer, ignore_result=True)


def footprint(pid: int) -> tuple[int, int]:
    return rss_bytes(pid), psutil.Process(pid).num_fds()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_of_50000_inputs_through_scale_cycles_loses_nothing_and_leaks_nothing(faults):
    node = faults.node("soak")
    store = faults.app.recorder.store()
    cold = footprint(node.pid)
    helpers = {p.pid for p in descendants(node.pid)}  # its pool child, the fork server
    started = time.monotonic()
    warm = None
    scale_ups = 0
    for cycle in range(1, CYCLES + 1):
        send(faults, PER_CYCLE)
        wait_for(
            lambda n=cycle: int(store.get("done:soak") or 0) >= n * PER_CYCLE,
            180,
            interval=0.2,
            what=f"cycle {cycle} done",
        )
        scale_ups = max(scale_ups, row(faults.app, SOAK)["scale_ups"])
        # Idle past scaledown_window (1 s): back to zero containers before the next burst.
        wait_for(lambda: row(faults.app, SOAK)["containers"] == 0, 30, what="scale to zero")
        if cycle == 1:
            warm = footprint(node.pid)
    elapsed = time.monotonic() - started
    end = footprint(node.pid)
    final = row(faults.app, SOAK)
    total = CYCLES * PER_CYCLE
    assert warm is not None
    print(
        f"\nsoak[{faults.kind}]: {total} inputs in {elapsed:.0f}s ({total / elapsed:.0f}/s), "
        f"{final['scale_ups']} scale-ups, {final['scale_downs']} scale-downs; node RSS "
        f"{cold[0] >> 20}/{warm[0] >> 20}/{end[0] >> 20} MiB and fds {cold[1]}/{warm[1]}/{end[1]} "
        "(cold/after the first cycle/end)"
    )
    time.sleep(1)
    assert int(store.get("done:soak")) == total
    assert faults.queue_length("soak") == 0
    assert final["crashes"] == 0 and final["scale_ups"] >= CYCLES
    # Measured from the first cycle on: the first burst imports, connects and caches.
    assert end[0] <= warm[0] * 1.10, (warm, end)
    assert end[1] <= warm[1] * 1.10, (warm, end)
    assert {p.pid for p in descendants(node.pid)} == helpers  # no container left behind
