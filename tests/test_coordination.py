"""Which Redis holds a cluster's leases, the scope a node runs in, and what status shows."""

from __future__ import annotations

import logging

import pytest
from celery import Celery

from celery_concurrent import FunctionSpec
from celery_concurrent.coordination import (
    CoordinationStore,
    configured_scope,
    coordination_store,
    lease_ttl,
)
from celery_concurrent.errors import ConfigurationError
from celery_concurrent.status import FunctionStatus, merge
from celery_concurrent.supervisor.cluster import ClusterScope, NodeScope
from celery_concurrent.supervisor.redelivery import Redelivery
from celery_concurrent.supervisor.supervisor import SupervisorSettings, make_scope

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(autouse=True)
def _no_broker_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery reads these over the settings; the suite sets the first for its test apps.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)


def make_app(**conf: object) -> Celery:
    app = Celery("coordination", set_as_current=False)
    app.conf.update(conf)
    return app


def test_the_setting_wins_over_the_broker_and_the_backend():
    app = make_app(
        broker_url="redis://127.0.0.1:1/0",
        result_backend="redis://127.0.0.1:2/0",
        concurrent_coordination_url="redis://127.0.0.1:3/0",
    )
    assert coordination_store(app) == CoordinationStore(
        "concurrent_coordination_url", "redis://127.0.0.1:3/0"
    )


def test_a_redis_broker_holds_the_leases_under_its_global_keyprefix():
    app = make_app(
        broker_url="redis://127.0.0.1:1/0",
        broker_transport_options={"global_keyprefix": "app1:"},
    )
    store = coordination_store(app)
    assert store is not None
    assert (store.source, store.prefix) == ("broker_url", "app1:celery-concurrent")


def test_rabbitmq_with_a_redis_backend_holds_the_leases_in_the_backend():
    app = make_app(broker_url=AMQP, result_backend="redis://127.0.0.1:2/0")
    store = coordination_store(app)
    assert store is not None and store.source == "result_backend"


def test_rabbitmq_without_redis_has_no_store_and_the_node_says_so_once(caplog):
    app = make_app(broker_url=AMQP, result_backend="rpc://")
    assert coordination_store(app) is None
    spec = FunctionSpec.from_options("proj.fetch", {})
    settings = SupervisorSettings(app_ref="proj", hostname="host")
    with caplog.at_level(logging.WARNING):
        scope = make_scope(app, [spec], settings, Redelivery(app))
    assert isinstance(scope, NodeScope)
    warnings = [r.getMessage() for r in caplog.records if "cluster" in r.getMessage()]
    assert len(warnings) == 1
    assert "concurrent_coordination_url" in warnings[0]


def test_a_redis_broker_gives_the_cluster_scope_and_node_scope_opts_out():
    app = make_app(broker_url="redis://127.0.0.1:1/0")
    spec = FunctionSpec.from_options("proj.fetch", {})
    settings = SupervisorSettings(app_ref="proj", hostname="host", nodename="n1@host")
    scope = make_scope(app, [spec], settings, Redelivery(app))
    assert isinstance(scope, ClusterScope)
    assert scope.routing_keys == {"proj.fetch": spec.queue}
    scope.close()
    settings.scope = "node"
    assert isinstance(make_scope(app, [spec], settings, Redelivery(app)), NodeScope)


@pytest.mark.parametrize("url", ["amqp://localhost//", "http://x", "redis"])
def test_a_coordination_url_that_is_not_redis_names_the_setting(url):
    app = make_app(broker_url="redis://127.0.0.1:1/0", concurrent_coordination_url=url)
    with pytest.raises(ConfigurationError, match="concurrent_coordination_url"):
        coordination_store(app)


def test_scope_from_the_option_then_the_setting_then_the_default():
    app = make_app()
    assert configured_scope(app, None) == "cluster"
    app.conf.concurrent_scope = "node"
    assert configured_scope(app, None) == "node"
    assert configured_scope(app, "cluster") == "cluster"
    app.conf.concurrent_scope = "everywhere"
    with pytest.raises(ConfigurationError, match="concurrent_scope='everywhere'"):
        configured_scope(app, None)


@pytest.mark.parametrize(
    ("value", "ok"), [(None, 10.0), (3, 3.0), ("2.5", 2.5), (0, None), ("x", None)]
)
def test_lease_ttl_setting(value, ok):
    app = make_app(concurrent_lease_ttl=value)
    if ok is None:
        with pytest.raises(ConfigurationError, match="concurrent_lease_ttl"):
            lease_ttl(app)
    else:
        assert lease_ttl(app) == ok


def node_row(**fields: object) -> FunctionStatus:
    spec = FunctionSpec.from_options("proj.fetch", {"max_containers": 3})
    return FunctionStatus.of_spec(spec, scope="cluster", **fields)  # type: ignore[arg-type]


def test_merged_rows_are_the_cluster_totals_with_each_node_apart():
    (row,) = merge(
        {
            "n1@host": [node_row(containers=2, pids=[11, 12], cluster_containers=3, swept=2)],
            "n2@host": [node_row(containers=1, pids=[21], cluster_containers=3)],
        }
    )
    assert (row.containers, row.pids, row.cluster_containers, row.swept) == (3, [11, 12, 21], 3, 2)
    assert row.per_node["n2@host"]["pids"] == [21]
    assert row.per_node["n1@host"]["scope"] == "cluster"
    assert not row.spec_conflict


def test_nodes_that_disagree_on_the_bounds_are_flagged_and_the_strictest_shows():
    relaxed = node_row()
    relaxed.max_containers = 10
    (row,) = merge({"n1@host": [node_row()], "n2@host": [relaxed]})
    assert row.spec_conflict and row.max_containers == 3
    (mixed,) = merge(
        {
            "n1@host": [node_row()],
            "n2@host": [
                FunctionStatus.of_spec(
                    FunctionSpec.from_options("proj.fetch", {"max_containers": 3}), scope="node"
                )
            ],
        }
    )
    assert mixed.scope == "mixed"


def test_the_status_table_shows_a_batch_column_only_for_batched_functions():
    from celery_concurrent.cli import render_table

    plain = FunctionStatus.of_spec(FunctionSpec.from_options("proj.fetch", {})).as_dict()
    assert "BATCH" not in render_table([plain])
    batched = dict(plain, function="proj.embed", max_batch_size=32, batch_size_mean=7.25)
    table = render_table([plain, batched]).splitlines()
    assert "BATCH (mean/max)" in table[0]
    assert "7.2/32" in table[2] and "7.2/32" not in table[1]


def test_nodes_that_disagree_on_a_batch_size_are_flagged():
    other = node_row()
    other.max_batch_size, other.wait_ms = 16, 20
    mine = node_row()
    mine.max_batch_size, mine.wait_ms = 32, 20
    (row,) = merge({"n1@host": [mine], "n2@host": [other]})
    assert row.spec_conflict
