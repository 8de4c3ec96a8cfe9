"""docker/: no Docker engine runs here, so the compose file is read and every command checked.

Each service built from the node image runs ``ENTRYPOINT + command``; that command line
is parsed with Celery's own options plus this package's worker options, so a misspelled
or retired option, a function that does not exist or a module that does not import
fails here rather than in a container.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from celery.app.utils import find_app
from celery.bin.base import CLIContext
from celery.bin.celery import celery as celery_command
from celery.bin.worker import worker as worker_command
from flower.options import options as flower_options

from celery_concurrent import specs_of
from celery_concurrent.cli import concurrent as concurrent_command
from celery_concurrent.plugin import WORKER_OPTIONS

from .support import ROOT

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
SUBCOMMANDS = {"worker", "flower", "concurrent"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def build_of(service: dict[str, Any]) -> tuple[Path, Path] | None:
    build = service.get("build")
    if build is None:
        return None
    context = (COMPOSE.parent / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def exec_form(path: Path, instruction: str) -> list[str]:
    (found,) = [args for name, args in dockerfile_instructions(path) if name == instruction]
    return json.loads(found)


def argv_of(service: dict[str, Any]) -> list[str]:
    built = build_of(service)
    assert built is not None
    command = service.get("command")
    if command is None:
        command = exec_form(built[1], "CMD")
    elif isinstance(command, str):
        command = shlex.split(command)
    return [*exec_form(built[1], "ENTRYPOINT"), *map(str, command)]


def check_celery_command(argv: list[str]) -> tuple[Any, str, click.Context | None]:
    """Parse a ``celery ...`` command line as the real CLI would; return (app, subcommand, ctx)."""
    assert argv[0] == "celery", argv
    args = argv[1:]
    at = next(i for i, arg in enumerate(args) if arg in SUBCOMMANDS)
    top = celery_command.make_context("celery", args[:at])
    app = find_app(top.params["app"])
    sub, rest = args[at], args[at + 1 :]
    obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    if sub == "worker":
        params = {p.name: p for p in [*worker_command.params, *WORKER_OPTIONS]}
        command = click.Command("worker", params=list(params.values()))
        ctx = command.make_context("worker", rest, obj=obj)
        named = [ctx.params.get("concurrent_function") or ""]
        named += (ctx.params.get("concurrent_functions") or "").split(",")
        for function in filter(None, named):
            assert function in specs_of(app), f"{app.main} has no @concurrent task {function}"
        return app, sub, ctx
    if sub == "flower":
        for arg in rest:
            assert arg.startswith("--"), f"flower takes --name=value options, not {arg!r}"
            name = arg[2:].split("=", 1)[0].replace("_", "-")
            assert name in flower_options._options, f"flower has no option --{name}"
        return app, sub, None
    return app, sub, concurrent_command.make_context("concurrent", rest, obj=obj)


def test_every_image_is_built_from_a_context_and_dockerfile_that_exist():
    built = {name: build_of(s) for name, s in services().items() if "build" in s}
    assert {"node", "gpu-node", "flower", "fetch"} <= set(built)
    for name, (context, dockerfile) in built.items():
        assert context == ROOT, name
        assert dockerfile.is_file(), name
        ignored = [
            line.strip()
            for line in (context / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for instruction, args in dockerfile_instructions(dockerfile):
            if instruction == "COPY" and not args.startswith("--from"):
                *sources, _destination = args.split()
                for source in sources:
                    assert (context / source).exists(), f"{name}: COPY {source}: not in {context}"
                    assert not any(fnmatch.fnmatch(source, p) for p in ignored), (
                        f"{name}: COPY {source}: .dockerignore leaves it out of the context"
                    )


def test_the_images_default_command_is_a_real_node_command():
    dockerfile = DOCKER / "Dockerfile"
    argv = [*exec_form(dockerfile, "ENTRYPOINT"), *exec_form(dockerfile, "CMD")]
    _, sub, _ = check_celery_command(argv)
    assert sub == "worker"


@pytest.mark.parametrize("name", sorted(n for n, s in services().items() if "build" in s))
def test_every_service_runs_a_real_command_with_real_options(name: str):
    app, _, _ = check_celery_command(argv_of(services()[name]))
    assert specs_of(app), f"{name}: -A {app.main} has no @concurrent function"


def test_the_gpu_node_reserves_nvidia_devices_and_detects_them_itself():
    service = services()["gpu-node"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    argv = argv_of(service)
    assert "--gpus" not in argv  # detection with nvidia-smi, not a simulation
    app, sub, _ = check_celery_command(argv)
    assert sub == "worker"
    assert any(spec.gpu for spec in specs_of(app).values())
    assert "utility" in service["environment"]["NVIDIA_DRIVER_CAPABILITIES"]  # nvidia-smi


def test_redis_is_always_there_and_rabbitmq_behind_a_profile():
    found = services()
    assert "profiles" not in found["redis"]
    assert found["rabbitmq"]["profiles"] == ["rabbitmq"]
    for name, service in found.items():
        image = service.get("image", "")
        assert ":" in image or "build" in service, f"{name}: pin the image's tag ({image})"
    nodes = [s for s in found.values() if "build" in s]
    assert all("redis" in s.get("depends_on", {}) for s in nodes)


def test_the_checker_refuses_what_the_real_cli_refuses():
    with pytest.raises(click.NoSuchOption):
        check_celery_command(
            ["celery", "-A", "examples.app", "worker", "--concurrent-funtion", "x"]
        )
    with pytest.raises(click.BadParameter):
        check_celery_command(["celery", "-A", "examples.app", "worker", "--gpus", "0A100"])
    with pytest.raises(AssertionError, match="no @concurrent task examples.app.fetsh"):
        check_celery_command(
            [
                "celery",
                "-A",
                "examples.app",
                "worker",
                "--concurrent-function",
                "examples.app.fetsh",
            ]
        )
    with pytest.raises(AssertionError, match="no option --prot"):
        check_celery_command(["celery", "-A", "examples.app", "flower", "--prot=5555"])
    with pytest.raises(ModuleNotFoundError):
        check_celery_command(["celery", "-A", "examples.nope", "worker"])
