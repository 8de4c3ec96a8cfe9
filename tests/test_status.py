"""The status row: one type, one constructor for an unserved function, one merge."""

from __future__ import annotations

import dataclasses

from celery_concurrent import FunctionSpec
from celery_concurrent.status import SUMMED, UNSERVED_ERROR, FunctionStatus, merge

SPEC = FunctionSpec.from_options("proj.fetch", {"max_inputs": 10, "max_containers": 4})


def node_row(host: str, **fields) -> FunctionStatus:
    defaults = dict(containers=2, ready=2, in_flight=15, capacity=20, backlog=5, pids=[1, 2])
    return FunctionStatus.of_spec(SPEC, node=host, **{**defaults, **fields})


def test_counts_add_up_over_nodes_and_each_node_keeps_its_own():
    (row,) = merge(
        {
            "a@one": [node_row("one", pids=[11, 12], crashes=1)],
            "b@two": [node_row("two", pids=[21], containers=1, ready=1, in_flight=3)],
        }
    )
    assert row.containers == 3 and row.ready == 3 and row.in_flight == 18
    assert row.capacity == 40 and row.crashes == 1
    assert row.pids == [11, 12, 21]
    assert row.nodes == ["a@one", "b@two"]
    assert row.node == "one,two"
    assert row.per_node["a@one"]["pids"] == [11, 12]
    assert row.per_node["b@two"]["in_flight"] == 3


def test_backlog_is_the_largest_reading_and_unknown_only_when_no_node_read_it():
    (row,) = merge({"a@h": [node_row("h", backlog=None)], "b@h": [node_row("h", backlog=7)]})
    assert row.backlog == 7
    (row,) = merge({"a@h": [node_row("h", backlog=None)]})
    assert row.backlog is None


def test_crash_loop_and_placeable_hold_if_they_hold_on_any_node():
    (row,) = merge(
        {"a@h": [node_row("h", crash_loop=True)], "b@h": [node_row("h", placeable=False)]}
    )
    assert row.crash_loop is True
    assert row.placeable is True


def test_the_newest_scale_event_wins():
    (row,) = merge(
        {
            "a@h": [node_row("h", last_event="0 -> 1", last_event_at=20.0)],
            "b@h": [node_row("h", last_event="1 -> 2", last_event_at=10.0)],
        }
    )
    assert row.last_event == "0 -> 1"


def test_a_function_no_node_serves_has_every_field_of_a_served_one():
    (served,) = merge({"a@h": [node_row("h")]})
    (unserved,) = merge({}, [SPEC])
    assert unserved.as_dict().keys() == served.as_dict().keys()
    assert unserved.error == UNSERVED_ERROR
    assert unserved.nodes == [] and unserved.containers == 0
    assert unserved.max_containers == 4 and unserved.max_inputs == 10


def test_a_served_function_is_not_also_given_an_unserved_row():
    rows = merge({"a@h": [node_row("h")]}, [SPEC])
    assert [r.function for r in rows] == ["proj.fetch"]
    assert rows[0].error is None


def test_a_row_from_a_newer_node_parses_without_its_unknown_keys():
    data = {**node_row("h").as_dict(), "a_later_field": 1}
    assert FunctionStatus.from_dict(data) == node_row("h")


def test_summed_fields_are_counts_of_the_row():
    types = {f.name: f.type for f in dataclasses.fields(FunctionStatus)}
    assert all(types[name] == "int" for name in SUMMED)
