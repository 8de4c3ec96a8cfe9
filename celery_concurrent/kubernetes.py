"""``celery -A proj concurrent kubernetes``: one Deployment per function, scaled by KEDA.

Past a few machines the engine that adds and removes pods already exists. Each
``@concurrent`` function gets a Deployment of single-container pods (``celery worker
--concurrent-function NAME``, the same container a supervisor starts) and a KEDA
``ScaledObject`` whose ``metrics-api`` trigger reads the function's true demand (backlog +
in flight, over every container) from our demand endpoint (``scaler.py``), which a
Deployment and a Service of their own serve. The builders here are pure: a spec and the
options in, plain dicts out; ``docs/kubernetes.md`` says what each field is for.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import yaml
from celery.bin.base import CeleryCommand

from .constants import DEFAULT_DRAIN_TIMEOUT
from .container.health import ALIVE_FILE, HEALTH_ENV, READY_FILE
from .errors import UnknownFunctionError
from .gpu import ANY, GpuRequest
from .registry import specs_of
from .scaler import DEFAULT_SCALER_PORT
from .spec import FunctionSpec
from .supervisor.app_ref import command_line_app

#: the KEDA release whose ScaledObject documentation the generated objects follow
KEDA_RELEASE = "2.17"
#: the Kubernetes release whose schemas the generated objects are validated against
KUBERNETES_RELEASE = "1.37.0"
#: the Secret the broker and result backend URLs come from unless ``--secret`` says
DEFAULT_SECRET = "celery-concurrent"
#: the keys of that Secret, and the environment variables Celery reads them from
SECRET_KEYS = {"broker-url": "CELERY_BROKER_URL", "result-backend": "CELERY_RESULT_BACKEND"}
#: seconds a pod gets to drain after its SIGTERM: what a supervisor gives a retiring
#: container, and a margin for the warm shutdown itself
DEFAULT_GRACE_PERIOD = int(DEFAULT_DRAIN_TIMEOUT) + 30
#: how often KEDA polls the demand endpoint while a Deployment is at zero (KEDA's 30)
DEFAULT_POLLING_INTERVAL = 5
#: the most ``nvidia.com/gpu`` one pod may ask unless ``--max-gpus-per-pod`` says (the
#: largest common GPU node holds 8)
DEFAULT_MAX_GPUS_PER_POD = 8
#: the demand endpoint's name, port and where the pods keep their health files
SCALER_NAME = "celery-concurrent-scaler"
HEALTH_DIR = "/tmp/celery-concurrent"
#: the label NVIDIA's GPU feature discovery sets to the device's product name
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
#: the ``nvidia.com/gpu.product`` values of common models (NVML's name, spaces as ``-``);
#: ``--gpu-product MODEL=VALUE,...`` adds or replaces
GPU_PRODUCTS: Mapping[str, tuple[str, ...]] = {
    "A100": (
        "NVIDIA-A100-SXM4-40GB",
        "NVIDIA-A100-SXM4-80GB",
        "NVIDIA-A100-PCIE-40GB",
        "NVIDIA-A100-80GB-PCIe",
    ),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
    "H200": ("NVIDIA-H200",),
    "L4": ("NVIDIA-L4",),
    "L40S": ("NVIDIA-L40S",),
    "A10G": ("NVIDIA-A10G",),
    "T4": ("Tesla-T4",),
    "V100": ("Tesla-V100-SXM2-16GB", "Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-16GB"),
}
#: a pod's label of its function, and the annotation that keeps the full task name
FUNCTION_LABEL = "celery-concurrent/function"
TASK_ANNOTATION = "celery-concurrent/task"
_PART_OF = {"app.kubernetes.io/part-of": "celery-concurrent"}


class ManifestError(ValueError):
    """The manifests cannot be made as asked: the message says why."""


@dataclass(frozen=True)
class ManifestOptions:
    """What the command line says about every manifest.

    Parameters
    ----------
    app:
        The ``-A`` the pods start with (``proj``, ``proj.celery:app``).
    image:
        The container image that holds the app and celery-concurrent.
    namespace:
        Where the objects go; ``None`` leaves it to ``kubectl``.
    secret:
        The Secret holding ``broker-url`` (and optionally ``result-backend``).
    max_replicas:
        ``maxReplicaCount`` of a function that has no ``max_containers``.
    grace_period:
        ``terminationGracePeriodSeconds``: the longest an input may take to finish
        after its pod is told to stop.
    """

    app: str
    image: str
    namespace: str | None = None
    secret: str = DEFAULT_SECRET
    max_replicas: int | None = None
    grace_period: int = DEFAULT_GRACE_PERIOD
    polling_interval: int = DEFAULT_POLLING_INTERVAL
    max_gpus_per_pod: int = DEFAULT_MAX_GPUS_PER_POD
    scaler_port: int = DEFAULT_SCALER_PORT
    gpu_products: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def scaler_url(self) -> str:
        host = SCALER_NAME if self.namespace is None else f"{SCALER_NAME}.{self.namespace}.svc"
        return f"http://{host}:{self.scaler_port}"


def manifests(specs: Sequence[FunctionSpec], options: ManifestOptions) -> list[dict[str, Any]]:
    """Every object to apply: per function a Deployment and a ScaledObject, then the
    demand endpoint's Deployment and Service. Raises :class:`ManifestError`."""
    names = object_names([spec.name for spec in specs])
    docs: list[dict[str, Any]] = []
    for spec in specs:
        docs.append(function_deployment(spec, names[spec.name], options))
        docs.append(scaled_object(spec, names[spec.name], options))
    docs.extend([scaler_deployment(options), scaler_service(options)])
    return docs


def object_names(tasks: Sequence[str]) -> dict[str, str]:
    """A DNS-1123 name (at most 63 characters) per task name, unique among ``tasks``.

    ``proj.fetch`` -> ``proj-fetch``; a name cut short, or one two tasks would share,
    ends with a digest of the task name.
    """
    plain = {task: re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-") or "f" for task in tasks}
    taken = [name for name in plain.values()]
    names = {}
    for task, name in plain.items():
        if len(name) > 63 or taken.count(name) > 1:
            digest = hashlib.sha256(task.encode()).hexdigest()[:8]
            name = f"{name[:54].rstrip('-')}-{digest}"
        names[task] = name
    return names


def function_deployment(spec: FunctionSpec, name: str, options: ManifestOptions) -> dict[str, Any]:
    """The Deployment of one function: pods of one container each."""
    labels = {**_PART_OF, "app.kubernetes.io/component": "container", FUNCTION_LABEL: name}
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": options.grace_period,
        "containers": [_container(spec, options)],
    }
    if spec.gpu is not None:
        affinity = gpu_affinity(spec, options)
        if affinity:
            pod["affinity"] = {"nodeAffinity": affinity}
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    annotations = {TASK_ANNOTATION: spec.name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, options, labels, annotations),
        "spec": {
            # No replicas: KEDA owns the count, and applying again must not reset it.
            "selector": {"matchLabels": {FUNCTION_LABEL: name}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod,
            },
        },
    }


def container_command(spec: FunctionSpec, app: str) -> list[str]:
    """The command line a function's pod runs: one container of the function."""
    command = ["celery", "-A", app, "worker", "--concurrent-function", spec.name, "-l", "INFO"]
    if spec.pool == "gevent":
        command += ["-P", "gevent"]  # gevent must patch before the app imports
    return command


def _container(spec: FunctionSpec, options: ManifestOptions) -> dict[str, Any]:
    alive, ready = f"{HEALTH_DIR}/{ALIVE_FILE}", f"{HEALTH_DIR}/{READY_FILE}"
    container: dict[str, Any] = {
        "name": "container",
        "image": options.image,
        "command": container_command(spec, options.app),
        "env": [*secret_env(options.secret), {"name": HEALTH_ENV, "value": HEALTH_DIR}],
        # Files the container itself keeps (container/health.py): a probe reads one,
        # asking nothing of the broker.
        "readinessProbe": {
            "exec": {"command": ["test", "-f", ready]},
            "periodSeconds": 5,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "exec": {"command": ["sh", "-c", fresh_file_test(alive, 60)]},
            "initialDelaySeconds": 30,
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
    }
    if spec.gpu is not None:
        count = gpu_count(spec, options.max_gpus_per_pod)
        container["resources"] = {"limits": {GPU_RESOURCE: count}}
    return container


def fresh_file_test(path: str, seconds: int) -> str:
    """A POSIX shell test that ``path`` was written within ``seconds``."""
    return f'test $(( $(date +%s) - $(stat -c %Y "{path}") )) -lt {seconds}'


def secret_env(secret: str) -> list[dict[str, Any]]:
    """The broker and backend URLs, read from ``secret`` (the backend's key optional)."""
    return [
        {
            "name": variable,
            "valueFrom": {
                "secretKeyRef": {"name": secret, "key": key, "optional": key != "broker-url"}
            },
        }
        for key, variable in SECRET_KEYS.items()
    ]


def gpu_count(spec: FunctionSpec, most: int) -> int:
    """The ``nvidia.com/gpu`` a pod of ``spec`` asks: one Deployment has one count."""
    assert spec.gpu is not None
    counts = {request.count for request in spec.gpu}
    if len(counts) > 1:
        raise ManifestError(
            f"{spec.name}: gpu={[str(g) for g in spec.gpu]} asks different GPU counts; a "
            "Deployment's pods all ask the same, so give every fallback the same count"
        )
    count = counts.pop()
    if count > most:
        raise ManifestError(
            f"{spec.name}: gpu asks {count} GPUs per pod, above the {most} a pod can ask "
            "(--max-gpus-per-pod)"
        )
    return count


def gpu_affinity(spec: FunctionSpec, options: ManifestOptions) -> dict[str, Any]:
    """Node affinity for the models ``spec`` names: only nodes with one of them (unless
    it accepts any GPU), the first choice preferred most; empty for ``gpu="any"``."""
    assert spec.gpu is not None
    named = [request for request in spec.gpu if request.model != ANY]
    choices = [(request, gpu_products(request, options.gpu_products)) for request in named]
    preferred = [
        {
            "weight": max(1, 100 - 10 * rank),
            "preference": {
                "matchExpressions": [
                    {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(values)}
                ]
            },
        }
        for rank, (_, values) in enumerate(choices)
    ]
    affinity: dict[str, Any] = {}
    if preferred and len(named) == len(spec.gpu):
        every = [value for _, values in choices for value in values]
        expression = {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": every}
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": [expression]}]
        }
    if len(preferred) > 1 or (preferred and len(named) < len(spec.gpu)):
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    return affinity


def gpu_products(request: GpuRequest, given: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The ``nvidia.com/gpu.product`` values of a model: ``--gpu-product``, else the table."""
    values = given.get(request.model) or GPU_PRODUCTS.get(request.model)
    if not values:
        raise ManifestError(
            f"no nvidia.com/gpu.product value is known for the GPU model {request.model}; "
            f"give it with --gpu-product {request.model}=VALUE (see `kubectl get nodes "
            "-L nvidia.com/gpu.product`)"
        )
    return tuple(values)


def scaled_object(spec: FunctionSpec, name: str, options: ManifestOptions) -> dict[str, Any]:
    """The KEDA ScaledObject of one function's Deployment (KEDA :data:`KEDA_RELEASE`)."""
    maximum = spec.max_containers if spec.max_containers is not None else options.max_replicas
    if maximum is None:
        raise ManifestError(
            f"{spec.name} has no max_containers: give --max-replicas, the most pods KEDA "
            "may run of a function without one"
        )
    window = math.ceil(spec.scaledown_window)
    labels = {**_PART_OF, FUNCTION_LABEL: name}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(name, options, labels, {TASK_ANNOTATION: spec.name}),
        "spec": {
            "scaleTargetRef": {"name": name},
            "pollingInterval": options.polling_interval,
            "cooldownPeriod": window,
            "minReplicaCount": spec.min_containers,
            "maxReplicaCount": max(maximum, spec.min_containers),
            # Blind (the endpoint down or the broker unreachable): keep what runs, and
            # never fewer than min_containers.
            "fallback": {
                "failureThreshold": 3,
                "replicas": max(1, spec.min_containers),
                "behavior": "currentReplicasIfHigher",
            },
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _hpa_behavior(window)}},
            "triggers": [
                {
                    "type": "metrics-api",
                    "metricType": "AverageValue",
                    "metadata": {
                        "url": f"{options.scaler_url}/functions/{spec.name}",
                        "format": "json",
                        "valueLocation": "demand",
                        "targetValue": str(spec.target_inputs),
                        "activationTargetValue": "0",
                    },
                }
            ],
        },
    }


def _hpa_behavior(window: int) -> dict[str, Any]:
    # Up at once (every pod the demand asks for, each sync period); down only after the
    # function's scaledown_window, as our own policy does.
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 1000, "periodSeconds": 15},
                {"type": "Pods", "value": 100, "periodSeconds": 15},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": min(window, 3600),
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
        },
    }


def scaler_deployment(options: ManifestOptions) -> dict[str, Any]:
    """The demand endpoint's Deployment: ``celery concurrent scaler`` on the Service's port."""
    labels = {**_PART_OF, "app.kubernetes.io/component": "scaler"}
    port = options.scaler_port
    command = ["celery", "-A", options.app, "concurrent", "scaler"]
    command += ["--port", str(port), "--address", "0.0.0.0"]
    health = {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 10}
    container = {
        "name": "scaler",
        "image": options.image,
        "command": command,
        "env": secret_env(options.secret),
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": health,
        "livenessProbe": {**health, "initialDelaySeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(SCALER_NAME, options, labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def scaler_service(options: ManifestOptions) -> dict[str, Any]:
    """The Service KEDA's metrics-api trigger reaches the demand endpoint through."""
    labels = {**_PART_OF, "app.kubernetes.io/component": "scaler"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(SCALER_NAME, options, labels),
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "http", "port": options.scaler_port, "targetPort": options.scaler_port}
            ],
        },
    }


def _metadata(
    name: str,
    options: ManifestOptions,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if options.namespace:
        metadata["namespace"] = options.namespace
    metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


# -- the command ------------------------------------------------------------------------


def parse_gpu_products(given: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``--gpu-product A100=NVIDIA-A100-SXM4-80GB,...`` (repeatable) as model -> values."""
    products = {}
    for item in given:
        model, sep, values = item.partition("=")
        names = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not model.strip() or not names:
            raise ManifestError(f"--gpu-product {item!r}: expected MODEL=VALUE[,VALUE...]")
        products[model.strip().upper()] = names
    return products


@click.command(cls=CeleryCommand)
@click.option("--image", default=None, help="The container image (required).")
@click.option("--namespace", default=None, help="The namespace of every object.")
@click.option(
    "--functions", default=None, help="Comma-separated task names (default: every function)."
)
@click.option(
    "--secret",
    default=DEFAULT_SECRET,
    show_default=True,
    help="The Secret with the keys broker-url and (optional) result-backend.",
)
@click.option(
    "--max-replicas",
    type=click.IntRange(min=1),
    default=None,
    help="maxReplicaCount of a function without max_containers (required if one has none).",
)
@click.option(
    "--grace-period",
    type=click.IntRange(min=1),
    default=DEFAULT_GRACE_PERIOD,
    show_default=True,
    help="terminationGracePeriodSeconds: how long a stopping pod may drain its inputs.",
)
@click.option(
    "--polling-interval",
    type=click.IntRange(min=1),
    default=DEFAULT_POLLING_INTERVAL,
    show_default=True,
    help="KEDA's pollingInterval (seconds) for each ScaledObject.",
)
@click.option(
    "--max-gpus-per-pod",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_GPUS_PER_POD,
    show_default=True,
    help="The most nvidia.com/gpu one pod may ask.",
)
@click.option(
    "--gpu-product",
    multiple=True,
    help="MODEL=VALUE[,VALUE...]: the nvidia.com/gpu.product label values of a GPU model.",
)
@click.option(
    "--scaler-port", type=click.IntRange(1, 65535), default=DEFAULT_SCALER_PORT, show_default=True
)
@click.pass_context
def kubernetes(
    ctx: click.Context, functions: str | None, gpu_product: Sequence[str], **given: Any
) -> None:
    """Print Kubernetes manifests (multi-document YAML): a Deployment and a KEDA
    ScaledObject per @concurrent function, and the demand endpoint's Deployment and
    Service. See docs/kubernetes.md."""
    app = ctx.obj.app
    if not given["image"]:
        raise click.UsageError("give --image, the container image that holds the app")
    reference = command_line_app()
    if not reference:
        raise click.UsageError("give -A/--app: the pods start the same app")
    try:
        specs = chosen_specs(app, functions)
        options = ManifestOptions(
            app=reference, gpu_products=parse_gpu_products(gpu_product), **given
        )
        docs = manifests(specs, options)
    except (ManifestError, UnknownFunctionError) as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


def chosen_specs(app: Any, functions: str | None) -> list[FunctionSpec]:
    """The specs named in ``--functions`` (all of them by default), in the app's order."""
    specs = specs_of(app)
    if not functions:
        if not specs:
            raise ManifestError("the app has no @concurrent function")
        return list(specs.values())
    names = [name.strip() for name in functions.split(",") if name.strip()]
    for name in names:
        if name not in specs:
            raise UnknownFunctionError(name, list(specs))
    return [specs[name] for name in names]
