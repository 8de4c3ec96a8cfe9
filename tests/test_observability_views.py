"""What the monitoring views show, without processes: the watch table, the metrics
exposition, the cold-start histogram and the reuse of container names."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_concurrent.cli import WATCH_COLUMNS, errors_of, render_table, utilisation
from celery_concurrent.supervisor.metrics import metrics_registry
from celery_concurrent.supervisor.pool import ColdStarts, lowest_free_ident


def status_row(**values: Any) -> dict[str, Any]:
    row = {
        "function": "proj.fetch",
        "queue": "concurrent.proj.fetch",
        "nodes": ["celery@web1"],
        "containers": 2,
        "ready": 2,
        "retiring": 0,
        "min_containers": 1,
        "max_containers": 4,
        "max_inputs": 20,
        "target_inputs": 20,
        "in_flight": 30,
        "backlog": 7,
        "capacity": 40,
        "crashes": 0,
        "recycles": 0,
        "crash_loop": False,
        "error": None,
        "scale_ups": 2,
        "scale_downs": 1,
        "last_event": "1 -> 2 containers (backlog 30, in flight 20, capacity 20)",
        "last_event_at": 1.0,
    }
    row.update(values)
    return row


def test_watch_table_adds_utilisation_and_errors_to_the_status_columns() -> None:
    rows = [
        status_row(),
        status_row(
            function="proj.parse",
            containers=0,
            capacity=0,
            in_flight=0,
            crashes=4,
            crash_loop=True,
            error="exit status 3",
        ),
    ]
    header, fetch, parse = render_table(rows, WATCH_COLUMNS).splitlines()
    assert header.split("  ")[0] == "FUNCTION"
    for title in ("IN FLIGHT", "BACKLOG", "CAPACITY", "UTILISATION", "ERRORS"):
        assert title in header
    assert header.index("CAPACITY") < header.index("UTILISATION") < header.index("ERRORS")
    assert "75%" in fetch and fetch.endswith("-")
    assert "1 -> 2 containers" in fetch
    assert parse.endswith("crash loop (4 crashes); exit status 3")


def test_utilisation_is_in_flight_over_capacity() -> None:
    assert utilisation(status_row(in_flight=30, capacity=40)) == "75%"
    assert utilisation(status_row(in_flight=50, capacity=40)) == "125%"  # a burst above target
    assert utilisation(status_row(in_flight=0, capacity=0)) == "-"


def test_errors_name_unplaceable_and_unsupervised_functions() -> None:
    assert errors_of(status_row(error="unplaceable: no node has H100")) == (
        "unplaceable: no node has H100"
    )
    assert errors_of(status_row(error="no node supervises it")) == "no node supervises it"
    assert errors_of(status_row()) == "-"


def test_plain_status_table_keeps_its_columns() -> None:
    header = render_table([status_row()]).splitlines()[0]
    assert "UTILISATION" not in header and "ERRORS" not in header
    assert header.split()[-3:] == ["LAST", "SCALE", "EVENT"]


def test_cold_start_histogram_is_cumulative() -> None:
    starts = ColdStarts()
    for seconds in (0.08, 0.12, 0.3, 7.0, 90.0):
        starts.observe(seconds)
    buckets, total, count = starts.snapshot()
    cumulative = dict(buckets)
    assert (cumulative[0.05], cumulative[0.1], cumulative[0.25], cumulative[0.5]) == (0, 1, 2, 3)
    assert (cumulative[10.0], cumulative[60.0], cumulative[float("inf")]) == (4, 4, 5)
    assert count == 5 and abs(total - 97.5) < 1e-9


def test_container_idents_reuse_the_lowest_free_number() -> None:
    assert lowest_free_ident([]) == "1"
    assert lowest_free_ident(["1", "2", "4"]) == "3"
    assert lowest_free_ident(["gpu-1"], prefix="gpu-") == "gpu-2"


def fake_supervisor(rows: list[dict[str, Any]], starts: ColdStarts) -> Any:
    return SimpleNamespace(
        status=lambda: rows,
        settings=SimpleNamespace(node_max_containers=8),
        pools={row["function"]: SimpleNamespace(cold_starts=starts) for row in rows},
    )


def test_metrics_are_prefixed_and_labelled_by_function_and_node() -> None:
    starts = ColdStarts()
    starts.observe(0.12)
    rows = [status_row(), status_row(function="proj.ask", max_containers=None, crashes=2)]
    text = generate_latest(metrics_registry(fake_supervisor(rows, starts), "celery@web1"))
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert set(families) == {
        "celery_concurrent_containers",
        "celery_concurrent_in_flight",
        "celery_concurrent_backlog",
        "celery_concurrent_capacity",
        "celery_concurrent_min_containers",
        "celery_concurrent_max_containers",
        "celery_concurrent_scale_ups",
        "celery_concurrent_scale_downs",
        "celery_concurrent_crashes",
        "celery_concurrent_recycles",
        "celery_concurrent_cluster_containers",
        "celery_concurrent_leases_lost",
        "celery_concurrent_swept",
        "celery_concurrent_cold_start_seconds",
        "celery_concurrent_batch_size",
    }
    counters = ("ups", "downs", "crashes", "recycles", "leases_lost", "swept")
    assert {f.type for n, f in families.items() if n.endswith(counters)} == {"counter"}
    assert families["celery_concurrent_cold_start_seconds"].type == "histogram"

    def value(name: str, function: str, **labels: str) -> float:
        want = {"function": function, "node": "celery@web1", "scope": "node", **labels}
        family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
        (found,) = [
            s.value for s in families[family].samples if s.name == name and s.labels == want
        ]
        return found

    assert value("celery_concurrent_in_flight", "proj.fetch") == 30
    assert value("celery_concurrent_max_containers", "proj.fetch") == 4
    assert value("celery_concurrent_max_containers", "proj.ask") == 8  # the node's bound
    assert value("celery_concurrent_crashes_total", "proj.ask") == 2
    assert value("celery_concurrent_cold_start_seconds_bucket", "proj.ask", le="0.25") == 1
    assert value("celery_concurrent_cold_start_seconds_count", "proj.ask") == 1


def test_metrics_of_a_node_without_functions_are_empty_but_served() -> None:
    text = generate_latest(metrics_registry(None, "celery@web1")).decode()
    assert "celery_concurrent_containers" in text  # the family, with no samples
