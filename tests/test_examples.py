"""What a newcomer runs: ``make demo`` and every example, end to end, as subprocesses.

Each run carries a token in its environment, which every process it starts inherits
(Redis, nodes, containers, Flower): after it exits, no live process may carry the token
(:class:`tests.support.ModuleRun`).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from pathlib import Path

import pytest

from .support import ROOT, ModuleRun

RABBITMQ_URL = os.environ.get("CC_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def run_example(module: str, *args: str, timeout: float = 90, **env: str | None) -> str:
    """Run an example to its end; it must exit 0. Results go to its broker unless ``env`` says."""
    run = ModuleRun(module, *args, env={"CELERY_RESULT_BACKEND": None, **env})
    code = run.finish(timeout)
    assert code == 0, run.output[-4000:]
    return run.output


def last_json(output: str) -> list:
    return json.loads(output.strip().splitlines()[-1])


# --- make demo -------------------------------------------------------------------------------

DEMO_QUEUES = ("concurrent.examples.app.fetch", "concurrent.examples.app.ask")
EMBEDDED = {"CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None}


def test_demo_runs_on_an_embedded_redis_scales_up_and_down_and_leaves_nothing_running():
    output = run_example("examples.demo", "--quick", timeout=100, **EMBEDDED)
    assert "broker and results: embedded Redis on redis://127.0.0.1:" in output
    assert "Flower:   http://127.0.0.1:" in output
    assert "examples.app.fetch: 1 -> 2 containers" in output  # the scale-up
    assert "idle for scaledown_window 5s" in output  # the scale-down
    summary = output[output.index("summary") :]
    assert "inputs          240 (40 fetch, 200 ask), all done" in summary
    assert "examples.app.fetch   peak 2 containers" in summary
    assert "back to keep_warm=1" in summary and "back to keep_warm=0" in summary


# Ctrl-C and SIGTERM half-way through the demo: tests/test_cleanup.py.


def test_demo_on_rabbitmq_keeps_results_in_an_embedded_redis():
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            # What an earlier run may leave in the demo's queue: it purges it at its start.
            conn.SimpleQueue(DEMO_QUEUES[0]).put("a leftover")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable broker
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no RabbitMQ at {RABBITMQ_URL}: {exc}")
        pytest.skip(f"no RabbitMQ at {RABBITMQ_URL}: {exc}")
    try:
        output = run_example(
            "examples.demo",
            "--quick",
            timeout=100,
            CELERY_BROKER_URL=RABBITMQ_URL,
            CELERY_RESULT_BACKEND=None,
        )
    finally:
        with Connection(RABBITMQ_URL) as conn:
            for name in DEMO_QUEUES:  # RabbitMQ keeps them: leave nothing behind
                with contextlib.suppress(Exception):  # never declared if the run failed early
                    conn.channel().queue_delete(name)
                with contextlib.suppress(Exception):
                    conn.channel().exchange_delete(name)
    assert "broker: amqp://guest:**@127.0.0.1:5672//" in output
    assert "results: embedded Redis on redis://127.0.0.1:" in output
    assert "inputs          240 (40 fetch, 200 ask), all done" in output


# --- examples/ -------------------------------------------------------------------------------


def test_io_bound_example_runs_its_calls_concurrently_in_sync_and_async_containers(broker_url):
    rows = {
        r["function"].rsplit(".", 1)[1]: r
        for r in last_json(run_example("examples.io_bound", "--quick", "--json"))
    }
    assert rows["get_plain"]["peak_at_once"] == 2  # the node's pool: -c 2
    assert rows["get_sync"]["peak_at_once"] == 20  # 20 threads: all 20 calls at once
    assert rows["get_async"]["peak_at_once"] == 20
    assert rows["get_async"]["calls_per_s"] > 1.5 * rows["get_plain"]["calls_per_s"]


def test_batching_example_throughput_rises_with_allow_concurrent_inputs(broker_url):
    rows = last_json(run_example("examples.batching", "--quick", "--json"))
    assert [r["allow_concurrent_inputs"] for r in rows] == [1, 8, 32, 1]
    assert [round(r["mean_batch"]) for r in rows][0] == 1
    assert rows[1]["mean_batch"] > 4 and rows[2]["mean_batch"] > rows[1]["mean_batch"]
    throughput = [r["inputs_per_s"] for r in rows]
    assert throughput[0] * 2 < throughput[1] < throughput[2], throughput
    # @batched: one call for the prompts that arrived together, one container slot.
    assert rows[3]["max_batch_size"] == 32 and rows[3]["mean_batch"] > 4
    assert throughput[3] > throughput[0] * 2, throughput


def test_gpu_example_runs_only_on_the_simulated_gpu_node_one_device_per_container(broker_url):
    report = last_json(
        run_example(
            "examples.gpu_embeddings", "--gpus", "0:A100,1:A100", "--batches", "16", "--json"
        )
    )
    assert report["queue"] == "concurrent.gpu.examples.gpu_embeddings.app.embed"
    devices = {}
    for answer in report["answers"]:
        devices.setdefault(answer["container"], set()).add(answer["cuda_visible_devices"])
    assert all("-gpu-" in name for name in devices), devices  # never the cpu@ node
    assert all(len(seen) == 1 for seen in devices.values()), devices
    held = [device for seen in devices.values() for device in seen]
    assert len(held) == len(set(held)), devices  # no device shared by two containers


def test_gpu_example_says_it_needs_a_gpu_node_where_there_is_none():
    from celery_concurrent.supervisor.gpus import GPUS_ENV, detect_gpus

    if detect_gpus():
        pytest.skip("this machine has a GPU")
    run = ModuleRun("examples.gpu_embeddings", env={GPUS_ENV: None})
    assert run.finish(30) == 2
    assert 'asks for gpu="any": only a node with a GPU runs it' in run.output
    assert '--gpus "0:A100,1:A100"' in run.output


def test_existing_project_differs_only_by_the_import_and_the_decorator():
    folder = ROOT / "examples" / "existing_project"
    before = (folder / "before.py").read_text().splitlines()
    after = (folder / "after.py").read_text().splitlines()
    changes = [
        line for line in difflib.ndiff(before, after) if line[:2] in ("- ", "+ ") and line[2:]
    ]
    assert changes == [
        "+ from celery_concurrent import concurrent",
        "+ @concurrent(allow_concurrent_inputs=20, concurrency_limit=4)",
    ]


def test_existing_project_after_the_decorator_runs_the_slow_task_in_containers(broker_url):
    before, after = last_json(run_example("examples.existing_project", "--quick", "--json"))
    assert before["queue"] == "celery"
    assert after["queue"] == "concurrent.examples.existing_project.after.quote_shipping"
    assert before["receipt"] == after["receipt"] == "receipt for order 1 sent"
    assert after["calls_per_s"] > before["calls_per_s"]


def test_every_example_is_run_by_a_test_here():
    runnable = {f"examples.{p.parent.name}" for p in (ROOT / "examples").glob("*/__main__.py")}
    source = Path(__file__).read_text()
    assert len(runnable) == 4
    assert {module for module in runnable if f'"{module}"' not in source} == set()
