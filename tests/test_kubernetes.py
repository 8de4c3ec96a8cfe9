"""``celery concurrent kubernetes``: the manifests, checked against the official Kubernetes
schemas (kubernetes-validate, pinned in the dev extras), KEDA's documented ScaledObject
(tests/schemas/keda-2.17-scaledobject.json), the function specs field by field, and the
pod's command line started for real. No cluster runs here, and none is pretended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from celery_concurrent.kubernetes import (
    DEFAULT_GRACE_PERIOD,
    GPU_PRODUCTS,
    KEDA_RELEASE,
    KUBERNETES_RELEASE,
    ManifestError,
    ManifestOptions,
    manifests,
    object_names,
)
from celery_concurrent.registry import specs_of

from .support import ROOT

APP = "tests.apps.kube"
SCHEMA = Path(__file__).parent / "schemas" / f"keda-{KEDA_RELEASE}-scaledobject.json"


@pytest.fixture(scope="module")
def kube():
    from .apps import kube

    return kube


@pytest.fixture(scope="module")
def docs(kube) -> list[dict[str, Any]]:
    options = ManifestOptions(
        app=APP, image="registry.example/proj:1", namespace="jobs", max_replicas=7
    )
    return manifests(list(specs_of(kube.app).values()), options)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def of_task(docs: list[dict[str, Any]], kind: str, task: str) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"].get("annotations", {}).get("celery-concurrent/task") == task
    ]
    assert len(found) == 1, (kind, task)
    return found[0]


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def celery_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "concurrent", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- schemas -----------------------------------------------------------------------------


def test_every_deployment_and_service_validates_against_the_kubernetes_schemas(docs):
    checked = [d for d in docs if d["kind"] in ("Deployment", "Service")]
    assert len(checked) == 5 + 2  # a Deployment per function, the scaler's and its Service
    for doc in checked:
        # strict: a field the schema does not know fails too
        kubernetes_validate.validate(doc, KUBERNETES_RELEASE, strict=True)


def test_a_broken_deployment_fails_the_kubernetes_schema(docs):
    broken = json.loads(json.dumps(next(iter(by_kind(docs, "Deployment").values()))))
    pod(broken)["terminationGracePeriodSeconds"] = "long"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_RELEASE, strict=True)


def test_every_scaled_object_validates_against_kedas_documented_fields(docs):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    scaled = by_kind(docs, "ScaledObject")
    assert len(scaled) == 5
    for doc in scaled.values():
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
        # The HPA behaviour KEDA hands on is an autoscaling/v2 HorizontalPodAutoscaler's.
        behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda-hpa-x"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": doc["spec"]["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, KUBERNETES_RELEASE, strict=True)


@pytest.mark.parametrize(
    "mistake",
    [
        lambda s: s["spec"].pop("scaleTargetRef"),
        lambda s: s["spec"]["triggers"][0]["metadata"].pop("url"),
        lambda s: s["spec"]["triggers"][0]["metadata"].update(targetValu="2"),
        lambda s: s["spec"]["fallback"].update(behavior="sometimes"),
        lambda s: s["spec"].update(maxReplicaCount="3"),
    ],
    ids=["no target", "no url", "misspelt key", "unknown behavior", "count as text"],
)
def test_the_keda_schema_refuses_what_keda_documents_as_wrong(docs, mistake):
    schema = json.loads(SCHEMA.read_text())
    doc = json.loads(json.dumps(next(iter(by_kind(docs, "ScaledObject").values()))))
    mistake(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


# -- field by field ----------------------------------------------------------------------


def test_each_function_gets_a_deployment_of_its_container_command(docs, kube):
    for spec in specs_of(kube.app).values():
        deployment = of_task(docs, "Deployment", spec.name)
        (container,) = pod(deployment)["containers"]
        assert container["command"] == [
            "celery",
            "-A",
            APP,
            "worker",
            "--concurrent-function",
            spec.name,
            "-l",
            "INFO",
        ]
        assert container["image"] == "registry.example/proj:1"
        name = deployment["metadata"]["name"]
        assert deployment["metadata"]["namespace"] == "jobs"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["celery-concurrent/function"] == name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "replicas" not in deployment["spec"]  # KEDA owns it; a re-apply keeps it
        assert pod(deployment)["terminationGracePeriodSeconds"] == DEFAULT_GRACE_PERIOD


def test_the_urls_come_from_the_secret_and_never_appear_in_the_manifest(kube):
    options = ManifestOptions(app=APP, image="i", secret="proj-broker", max_replicas=3)
    kube.app.conf.broker_url = "redis://:hunter2@redis.internal:6379/0"
    try:
        text = yaml.safe_dump_all(manifests(list(specs_of(kube.app).values()), options))
    finally:
        kube.app.conf.broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
    assert "hunter2" not in text and "redis.internal" not in text
    for doc in yaml.safe_load_all(text):
        if doc["kind"] != "Deployment":
            continue
        env = {e["name"]: e for e in pod(doc)["containers"][0]["env"]}
        broker = env["CELERY_BROKER_URL"]["valueFrom"]["secretKeyRef"]
        assert broker == {"name": "proj-broker", "key": "broker-url", "optional": False}
        backend = env["CELERY_RESULT_BACKEND"]["valueFrom"]["secretKeyRef"]
        assert backend == {"name": "proj-broker", "key": "result-backend", "optional": True}
        assert "value" not in env["CELERY_BROKER_URL"]
        assert "value" not in env["CELERY_RESULT_BACKEND"]


def test_the_scaled_object_holds_the_functions_bounds_target_and_cooldown(docs, kube):
    specs = specs_of(kube.app)
    for spec in specs.values():
        scaled = of_task(docs, "ScaledObject", spec.name)["spec"]
        deployment = of_task(docs, "Deployment", spec.name)
        assert scaled["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
        assert scaled["minReplicaCount"] == spec.min_containers
        assert scaled["maxReplicaCount"] == (spec.max_containers or 7)
        window = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scaled["cooldownPeriod"] == window["stabilizationWindowSeconds"]
        assert scaled["cooldownPeriod"] >= spec.scaledown_window
        (trigger,) = scaled["triggers"]
        assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        assert meta["url"] == (
            f"http://celery-concurrent-scaler.jobs.svc:8080/functions/{spec.name}"
        )
        assert meta["valueLocation"] == "demand"
        assert meta["targetValue"] == str(spec.target_inputs)
        assert scaled["fallback"]["replicas"] == max(1, spec.min_containers)
    gated = of_task(docs, "ScaledObject", "tests.apps.kube.gated")["spec"]
    assert (gated["minReplicaCount"], gated["maxReplicaCount"]) == (1, 6)
    assert gated["triggers"][0]["metadata"]["targetValue"] == "2"
    assert of_task(docs, "ScaledObject", "tests.apps.kube.anygpu")["spec"]["cooldownPeriod"] == 13


def test_gpu_functions_ask_their_count_and_select_their_models(docs):
    embed = pod(of_task(docs, "Deployment", "tests.apps.kube.embed"))
    assert embed["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    required = embed["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = required["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": list(GPU_PRODUCTS["A100"])}
    ]
    assert (
        "preferredDuringSchedulingIgnoredDuringExecution" not in embed["affinity"]["nodeAffinity"]
    )
    assert embed["tolerations"][0]["key"] == "nvidia.com/gpu"

    generate = pod(of_task(docs, "Deployment", "tests.apps.kube.generate"))
    affinity = generate["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert set(term["matchExpressions"][0]["values"]) == {
        *GPU_PRODUCTS["H100"],
        *GPU_PRODUCTS["A100"],
    }
    preferred = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [p["preference"]["matchExpressions"][0]["values"] for p in preferred] == [
        list(GPU_PRODUCTS["H100"]),
        list(GPU_PRODUCTS["A100"]),
    ]
    assert preferred[0]["weight"] > preferred[1]["weight"]  # the first choice first

    anygpu = pod(of_task(docs, "Deployment", "tests.apps.kube.anygpu"))
    assert anygpu["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert "affinity" not in anygpu  # any GPU node; the resource request places it
    plain = pod(of_task(docs, "Deployment", "tests.apps.kube.unbounded"))
    assert "resources" not in plain["containers"][0] and "affinity" not in plain


def test_probes_read_files_and_ask_nothing_of_the_broker(docs):
    for deployment in by_kind(docs, "Deployment").values():
        (container,) = pod(deployment)["containers"]
        for name in ("readinessProbe", "livenessProbe"):
            probe = container[name]
            if "httpGet" in probe:  # the scaler's: its /healthz reads nothing
                assert probe["httpGet"]["path"] == "/healthz"
                continue
            command = probe["exec"]["command"]
            assert command[0] in ("test", "sh"), command  # no Python, no celery inspect
            assert "/tmp/celery-concurrent/" in command[-1]


def test_the_scaler_has_a_deployment_and_a_service_on_its_port(docs):
    deployment = by_kind(docs, "Deployment")["celery-concurrent-scaler"]
    (container,) = pod(deployment)["containers"]
    assert container["command"] == [
        "celery",
        "-A",
        APP,
        "concurrent",
        "scaler",
        "--port",
        "8080",
        "--address",
        "0.0.0.0",
    ]
    service = by_kind(docs, "Service")["celery-concurrent-scaler"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == 8080
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}


def test_object_names_are_dns_labels_unique_per_task():
    names = object_names(["proj.a_b", "proj.a-b", "proj." + "x" * 80, "Proj.Fetch"])
    assert len(set(names.values())) == 4
    for name in names.values():
        assert len(name) <= 63 and name == name.lower() and name[0].isalnum()
    assert names["Proj.Fetch"] == "proj-fetch"


def test_a_gpu_count_above_the_pod_limit_is_refused(kube):
    options = ManifestOptions(app=APP, image="i", max_gpus_per_pod=1, max_replicas=3)
    with pytest.raises(ManifestError, match="2 GPUs per pod, above the 1"):
        manifests([specs_of(kube.app)["tests.apps.kube.embed"]], options)


# -- the command -------------------------------------------------------------------------


def test_the_command_prints_yaml_for_the_named_functions():
    done = celery_cli("kubernetes", "--image", "img:1", "--functions", "tests.apps.kube.gated")
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout)]
    assert kinds == ["Deployment", "ScaledObject", "Deployment", "Service"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-replicas", "3"), "give --image"),
        (("--image", "i", "--functions", "tests.apps.kube.nope"), "not a @concurrent function"),
        (("--image", "i", "--max-gpus-per-pod", "1"), "above the 1 a pod can ask"),
        (("--image", "i"), "give --max-replicas"),
        (("--image", "i", "--max-replicas", "3", "--gpu-product", "A100"), "MODEL=VALUE"),
    ],
    ids=["no image", "unknown function", "gpu count", "no max", "bad gpu product"],
)
def test_errors_exit_non_zero_with_a_message_and_print_nothing(args, message):
    done = celery_cli("kubernetes", *args)
    assert done.returncode != 0
    assert done.stdout == ""
    assert message in done.stderr, done.stderr


# -- the command line, run ---------------------------------------------------------------


def test_the_deployments_command_line_really_serves_an_input(docs, broker_url, tmp_path, kube):
    """The pod's command and environment, with the Secret's value put in as Kubernetes
    would, started here as a subprocess: it serves an input, and its probes pass."""
    (container,) = pod(of_task(docs, "Deployment", "tests.apps.kube.gated"))["containers"]
    secret = {"broker-url": broker_url, "result-backend": broker_url}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env["PYTHONPATH"] = str(ROOT)
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        env[item["name"]] = secret[ref["key"]] if ref else item["value"]
    health = tmp_path / "health"
    env["CELERY_CONCURRENT_HEALTH_DIR"] = str(health)  # not the manifest's shared /tmp path
    command = [
        str(Path(sys.executable).parent / container["command"][0]),
        *container["command"][1:],
    ]
    with open(tmp_path / "pod.log", "wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        kube.app.conf.broker_url = broker_url
        kube.app.conf.result_backend = broker_url
        result = kube.gated.delay(41)
        kube.release(1)
        assert result.get(timeout=60) == 41
        probes = {
            name: [
                p.replace("/tmp/celery-concurrent", str(health))
                for p in container[name]["exec"]["command"]
            ]
            for name in ("readinessProbe", "livenessProbe")
        }
        for name, probe in probes.items():
            assert subprocess.run(probe).returncode == 0, name
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, (tmp_path / "pod.log").read_text()[-3000:]
    assert subprocess.run(probes["readinessProbe"]).returncode != 0  # stopped: not ready
