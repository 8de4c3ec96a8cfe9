"""A node's GPUs: the override, detection, model matching and the device allocator.

All pure (a fake ``nvidia-smi`` on PATH is the one process): what the supervisor does
with them is in ``test_gpu_supervisor.py`` and, with real nodes, ``test_gpu_nodes.py``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from celery import Celery

from celery_concurrent import ConfigurationError, concurrent, parse_gpu, spec_of
from celery_concurrent.gpu import describe_requests, unplaceable_reason
from celery_concurrent.routing import ConcurrentRouter
from celery_concurrent.supervisor.devices import (
    CUDA_ENV,
    DeviceAllocator,
    model_matches,
    place,
    placeable_count,
)
from celery_concurrent.supervisor.gpus import (
    DETECT_COMMAND,
    GPUS_ENV,
    GpuDevice,
    detect_gpus,
    node_gpus,
    parse_gpu_override,
    parse_nvidia_smi,
    restrict_to_visible,
)
from celery_concurrent.supervisor.supervisor import ident_prefix

A100_80 = "NVIDIA A100-SXM4-80GB"


def dev(id_: str, name: str = "A100", uuid: str | None = None) -> GpuDevice:
    return GpuDevice(id=id_, name=name, uuid=uuid)


def ids(devices: tuple[GpuDevice, ...] | None) -> list[str] | None:
    return None if devices is None else [d.id for d in devices]


# --- the override: --gpus / CELERY_CONCURRENT_GPUS ---------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("", (), id="empty-means-no-gpus"),
        pytest.param("   ", (), id="blank-means-no-gpus"),
        pytest.param("0:A100", (dev("0"),), id="one"),
        pytest.param("0:A100,1:A100", (dev("0"), dev("1")), id="two"),
        pytest.param(" 0 : A100 , 1:H100 ", (dev("0"), dev("1", "H100")), id="spaces-ignored"),
        pytest.param(f"3:{A100_80}", (dev("3", A100_80),), id="full-driver-name"),
        pytest.param("1:a100,0:a100", (dev("1", "a100"), dev("0", "a100")), id="order-kept"),
    ],
)
def test_gpus_override_parses_into_devices(value: str, expected: tuple[GpuDevice, ...]) -> None:
    assert parse_gpu_override(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0A100", id="no-colon"),
        pytest.param("A100", id="model-only"),
        pytest.param("0:", id="missing-model"),
        pytest.param(":A100", id="missing-index"),
        pytest.param("0:A100,", id="trailing-comma"),
        pytest.param("0:A100,,1:A100", id="empty-entry"),
        pytest.param("0:A100;1:A100", id="wrong-separator"),
        pytest.param("0:A100:2", id="count-is-not-an-override"),
        pytest.param("0:A100,0:A100", id="index-twice"),
        pytest.param("0 1:A100", id="space-in-index"),
    ],
)
@pytest.mark.parametrize("parameter", ["--gpus", GPUS_ENV])
def test_malformed_gpus_override_names_the_option_and_the_value(value: str, parameter: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_gpu_override(value, parameter)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter}={value!r}: ")


@pytest.mark.parametrize(
    ("option", "environ", "expected"),
    [
        pytest.param("0:A100", {GPUS_ENV: "0:H100,1:H100"}, ["0"], id="option-beats-env"),
        pytest.param("", {GPUS_ENV: "0:H100"}, [], id="empty-option-beats-env"),
        pytest.param(None, {GPUS_ENV: "0:H100,1:H100"}, ["0", "1"], id="env-beats-detection"),
        pytest.param(None, {GPUS_ENV: ""}, [], id="empty-env-means-none"),
        pytest.param(None, {}, ["7"], id="detection-without-override"),
    ],
)
def test_override_takes_precedence_over_detection(
    option: str | None, environ: dict[str, str], expected: list[str]
) -> None:
    def detect() -> tuple[GpuDevice, ...]:
        return (dev("7", "T4"),)

    assert ids(node_gpus(option, environ, detect=detect)) == expected


def test_malformed_env_override_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match=rf"^{GPUS_ENV}='0A100': "):
        node_gpus(None, {GPUS_ENV: "0A100"}, detect=tuple)


# --- detection: nvidia-smi and CUDA_VISIBLE_DEVICES --------------------------------------

SMI = """\
0, NVIDIA A100-SXM4-80GB, 81920 MiB, GPU-aaaa1111-0000-0000-0000-000000000000
1, NVIDIA A100-SXM4-80GB, 81920 MiB, GPU-bbbb2222-0000-0000-0000-000000000000
2, NVIDIA H100 80GB HBM3, 81559 MiB, GPU-cccc3333-0000-0000-0000-000000000000
3, Tesla T4, [N/A], GPU-dddd4444-0000-0000-0000-000000000000
"""


def test_nvidia_smi_output_parses_into_devices() -> None:
    devices = parse_nvidia_smi(SMI)
    assert ids(devices) == ["0", "1", "2", "3"]
    assert devices[0] == GpuDevice("0", A100_80, 81920, "GPU-aaaa1111-0000-0000-0000-000000000000")
    assert devices[2].name == "NVIDIA H100 80GB HBM3"
    assert devices[3].memory_mib is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param("", [], id="no-devices"),
        pytest.param("0, Tesla T4, 15360 MiB\n", ["0"], id="without-uuid"),
        pytest.param("0, Tesla T4, 15360 MiB\r\n\n1, Tesla T4, 15360 MiB\n", ["0", "1"], id="crlf"),
        pytest.param("No devices were found\n0, Tesla T4, 15360 MiB\n", ["0"], id="odd-line"),
        pytest.param("x, Tesla T4, 15360 MiB\n", [], id="index-not-a-number"),
    ],
)
def test_odd_nvidia_smi_lines_are_skipped(output: str, expected: list[str]) -> None:
    assert ids(parse_nvidia_smi(output)) == expected


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        pytest.param(None, ["0", "1", "2", "3"], id="unset-means-all"),
        pytest.param("", [], id="empty-means-none"),
        pytest.param("1,3", ["1", "3"], id="indices"),
        pytest.param("3,1", ["3", "1"], id="in-the-order-given"),
        pytest.param(" 2 , 0 ", ["2", "0"], id="spaces"),
        pytest.param("1,7,2", ["1"], id="stops-at-an-unknown-index"),
        pytest.param("-1", [], id="minus-one-hides-all"),
        pytest.param("1,1", ["1"], id="repeated"),
        pytest.param("GPU-cccc3333", ["2"], id="uuid-prefix"),
        pytest.param("gpu-DDDD4444-0000-0000-0000-000000000000,0", ["3", "0"], id="uuid-any-case"),
        pytest.param("MIG-1234", [], id="mig-is-not-a-whole-gpu"),
    ],
)
def test_cuda_visible_devices_restricts_detected_devices(
    visible: str | None, expected: list[str]
) -> None:
    assert ids(restrict_to_visible(parse_nvidia_smi(SMI), visible)) == expected


def test_detection_without_nvidia_smi_finds_no_gpus() -> None:
    assert detect_gpus({}, run=lambda: None) == ()


def test_detection_respects_cuda_visible_devices() -> None:
    devices = detect_gpus({"CUDA_VISIBLE_DEVICES": "2"}, run=lambda: SMI)
    assert ids(devices) == ["2"]


def _fake_nvidia_smi(tmp_path: Path, body: str) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_detection_runs_nvidia_smi_from_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(
        tmp_path, "printf '0, Tesla T4, 15360 MiB, GPU-1\\n1, Tesla T4, 15360 MiB, GPU-2\\n'"
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert ids(detect_gpus({"CUDA_VISIBLE_DEVICES": "1"})) == ["1"]
    assert (tmp_path / "args").read_text().split() == list(DETECT_COMMAND[1:])


def test_a_failing_nvidia_smi_means_no_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed"; exit 9')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus({}) == ()


# --- model matching ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "name", "matches"),
    [
        ("A100", A100_80, True),
        ("a100", A100_80, True),
        ("A100-80GB", A100_80, True),
        ("A100-40GB", A100_80, False),
        ("A100", "NVIDIA A100 80GB PCIe", True),
        ("A100", "A100", True),
        ("H100", "NVIDIA H100 80GB HBM3", True),
        ("H100", A100_80, False),
        ("A10", A100_80, False),
        ("A10G", "NVIDIA A10G", True),
        ("A10", "NVIDIA A10G", False),
        ("L4", "NVIDIA L40S", False),
        ("L40S", "NVIDIA L40S", True),
        ("T4", "Tesla T4", True),
        ("RTX-4090", "NVIDIA GeForce RTX 4090", True),
        ("RTX4090", "NVIDIA GeForce RTX 4090", True),
        ("4090", "NVIDIA GeForce RTX 4090", True),
        ("80GB-A100", A100_80, False),
        ("ANY", "Tesla T4", True),
        ("any", A100_80, True),
    ],
    ids=lambda v: v if isinstance(v, str) else str(v).lower(),
)
def test_model_matches_the_driver_name_case_insensitively(
    model: str, name: str, matches: bool
) -> None:
    assert model_matches(model, name) is matches


# --- placement ---------------------------------------------------------------------------

TWO_A100 = (dev("0"), dev("1"))


@pytest.mark.parametrize(
    ("gpu", "free", "expected", "chosen"),
    [
        pytest.param("A100", TWO_A100, ["0"], "A100", id="one-device"),
        pytest.param("A100:2", TWO_A100, ["0", "1"], "A100:2", id="two-devices"),
        pytest.param("A100:3", TWO_A100, None, None, id="too-few"),
        pytest.param("H100", TWO_A100, None, None, id="no-such-model"),
        pytest.param("A100", (), None, None, id="no-devices"),
        pytest.param(["H100", "A100"], TWO_A100, ["0"], "A100", id="fallback"),
        pytest.param(
            ["A100:2", "A100"], (dev("0"),), ["0"], "A100", id="fallback-to-fewer-devices"
        ),
        pytest.param(
            ["A100", "T4"], (dev("0", "T4"), dev("1")), ["1"], "A100", id="preference-over-order"
        ),
        pytest.param(["H100", "A100:2"], TWO_A100, ["0", "1"], "A100:2", id="fallback-pair"),
        pytest.param("any", (dev("0", "Tesla T4"),), ["0"], "any", id="any"),
        pytest.param(
            "any:2",
            (dev("0", "A100-40GB"), dev("1", "A100-80GB")),
            None,
            None,
            id="never-mixes-models",
        ),
        pytest.param(
            "any:2",
            (dev("0"), dev("1", "T4"), dev("2")),
            ["0", "2"],
            "any:2",
            id="same-model-pair",
        ),
    ],
)
def test_place_tries_fallbacks_in_order(
    gpu: object,
    free: tuple[GpuDevice, ...],
    expected: list[str] | None,
    chosen: str | None,
) -> None:
    placement = place(parse_gpu(gpu) or (), free)
    if expected is None:
        assert placement is None
    else:
        assert placement is not None
        assert ids(placement.devices) == expected
        assert str(placement.request) == chosen
        assert placement.environ() == {**CUDA_ENV, "CUDA_VISIBLE_DEVICES": ",".join(expected)}


@pytest.mark.parametrize(
    ("gpu", "free", "count"),
    [
        ("A100", TWO_A100, 2),
        ("A100:2", TWO_A100, 1),
        ("A100:2", (*TWO_A100, dev("2")), 1),
        (["A100:2", "A100"], (*TWO_A100, dev("2")), 2),
        ("H100", TWO_A100, 0),
        ("any", (dev("0"), dev("1", "T4")), 2),
        ("A100", (), 0),
    ],
    ids=str,
)
def test_placeable_count_is_how_many_containers_the_free_devices_hold(
    gpu: object, free: tuple[GpuDevice, ...], count: int
) -> None:
    assert placeable_count(parse_gpu(gpu) or (), free) == count


def test_allocator_never_gives_a_device_twice_and_takes_it_back() -> None:
    a100 = parse_gpu("A100") or ()
    allocator = DeviceAllocator(TWO_A100)
    first = allocator.allocate("c1", a100)
    second = allocator.allocate("c2", a100)
    assert first is not None and second is not None
    assert first.devices + second.devices == TWO_A100
    assert allocator.allocate("c3", a100) is None
    assert allocator.capacity(a100) == 0
    assert allocator.can_place(a100)  # with every device free it could
    assert allocator.release("c1") == first
    assert allocator.held("c1") is None
    assert allocator.free == first.devices
    third = allocator.allocate("c3", a100)
    assert third is not None and third.devices == first.devices
    assert allocator.release("never-held") is None


def test_allocator_refuses_a_second_allocation_to_one_owner() -> None:
    allocator = DeviceAllocator(TWO_A100)
    allocator.allocate("c1", parse_gpu("A100") or ())
    with pytest.raises(ValueError, match="c1"):
        allocator.allocate("c1", parse_gpu("A100") or ())


def test_allocator_falls_back_when_the_preferred_shape_no_longer_fits() -> None:
    requests = parse_gpu(["A100:2", "A100"]) or ()
    allocator = DeviceAllocator((*TWO_A100, dev("2")))
    pair = allocator.allocate("c1", requests)
    single = allocator.allocate("c2", requests)
    assert pair is not None and ids(pair.devices) == ["0", "1"]
    assert single is not None and ids(single.devices) == ["2"]
    assert str(single.request) == "A100"


def test_a_cpu_only_node_can_place_no_gpu_function() -> None:
    allocator = DeviceAllocator(())
    assert not allocator.can_place(parse_gpu("any") or ())
    assert allocator.capacity(parse_gpu("any") or ()) == 0


@pytest.mark.parametrize(
    ("gpu", "text"),
    [
        ("H100", "an H100"),
        ("A100", "an A100"),
        ("T4", "a T4"),
        ("L40S", "an L40S"),
        ("H100:2", "2 H100s"),
        ("any", "any GPU"),
        ("any:4", "4 GPUs"),
        (["H100", "A100:2"], "an H100 or 2 A100s"),
    ],
    ids=str,
)
def test_requests_are_described_for_people(gpu: object, text: str) -> None:
    assert describe_requests(parse_gpu(gpu) or ()) == text


def test_unplaceable_reason_names_what_no_node_has() -> None:
    assert unplaceable_reason(parse_gpu("H100") or ()) == "unplaceable: no node has an H100"


# --- queues and container names ----------------------------------------------------------


def test_a_gpu_function_gets_a_gpu_queue_and_queue_still_overrides(app: Celery) -> None:
    @app.task
    @concurrent(gpu="A100")
    def embed(texts: list[str]) -> int:
        return len(texts)

    @app.task
    @concurrent(gpu="A100", queue="embedders")
    def embed_here(texts: list[str]) -> int:
        return len(texts)

    @app.task
    @concurrent()
    def fetch(url: str) -> str:
        return url

    assert [spec_of(t).queue for t in (embed, embed_here, fetch)] == [
        f"concurrent.gpu.{embed.name}",
        "embedders",
        f"concurrent.{fetch.name}",
    ]
    router = ConcurrentRouter(app)
    assert router(embed.name) == {"queue": f"concurrent.gpu.{embed.name}"}


@pytest.mark.parametrize(
    ("nodename", "prefix"),
    [
        ("gpu@host", "gpu-"),
        ("cpu@host", "cpu-"),
        ("celery@host", ""),
        ("host", ""),
        ("", ""),
    ],
)
def test_container_idents_carry_the_node_name(nodename: str, prefix: str) -> None:
    assert ident_prefix(nodename) == prefix
