"""Device placement: the configuration's ``device``/``devices`` and ``instances``,
validated, resolved into a model spec, and planned onto the GPUs a process sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mandant.backends.placement import InstancePlace, place
from mandant.config import ModelSpec, check_devices, parse_config
from mandant.errors import ConfigError

MODEL = {
    "factory": "a:b",
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1]}],
}


def specs(*models: dict[str, Any]) -> list[ModelSpec]:
    config = parse_config({"tenants": [{"id": "acme"}], "models": list(models)})
    return config.model_specs(Path("."))


def refusal(**fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        specs({"name": "m", **MODEL, **fields})
    return err.value.errors


@pytest.mark.parametrize(
    ("fields", "devices"),
    [
        ({}, ("auto",)),
        ({"device": "cpu"}, ("cpu",)),
        ({"device": "cuda"}, ("cuda",)),
        ({"device": "cuda:01"}, ("cuda:1",)),
        ({"devices": ["cuda:1", "cuda:0"]}, ("cuda:1", "cuda:0")),
        ({"devices": ["cuda:2"]}, ("cuda:2",)),
    ],
)
def test_device_or_devices_become_the_specs_devices(
    fields: dict[str, Any], devices: tuple[str, ...]
) -> None:
    [spec] = specs({"name": "m", **MODEL, **fields})
    assert spec.devices == devices


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({"device": "gpu"}, "models.0.device", "expected auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:-1"}, "models.0.device", "expected auto, cpu, cuda or cuda:N"),
        ({"devices": []}, "models.0.devices", "expected at least one device"),
        ({"devices": ["cuda"]}, "models.0.devices", "'devices' lists GPUs as cuda:N"),
        ({"devices": ["cpu", "cuda:0"]}, "models.0.devices", "'devices' lists GPUs as cuda:N"),
        ({"devices": ["cuda:0", "cuda:00"]}, "models.0.devices", "a device is listed twice"),
        ({"device": "cuda:0", "devices": ["cuda:1"]}, "models.0", "not both"),
        ({"instances": 0}, "models.0.instances", "greater than 0"),
    ],
)
def test_bad_placements_are_refused_with_their_path(
    fields: dict[str, Any], path: str, reason: str
) -> None:
    [(where, message)] = refusal(**fields)
    assert where == path
    assert reason in message


def test_a_spec_built_by_hand_is_checked_too() -> None:
    [spec] = specs({"name": "m", **MODEL})
    with pytest.raises(ValueError, match="several devices are GPUs"):
        ModelSpec(**{**spec.model_dump(), "devices": ("cpu", "cuda:0")})
    assert check_devices(("cuda:3", "cuda:02")) == ("cuda:3", "cuda:2")


def test_a_tuned_variant_keeps_its_bases_devices_unless_it_names_its_own() -> None:
    base = {"name": "m", **MODEL, "devices": ["cuda:0", "cuda:1"], "instances": 2}
    same = {"tenant": "acme", "base": "m", "version": 2, "path": "t.pt"}
    own = {"tenant": "acme", "base": "m", "version": 3, "path": "t.pt", "device": "cpu"}
    shared, inherits, moves = specs(base, same, own)
    assert shared.devices == inherits.devices == ("cuda:0", "cuda:1")
    assert inherits.instances == 2
    assert moves.devices == ("cpu",)


@pytest.mark.parametrize(
    ("requested", "gpus", "devices"),
    [
        (("auto",), 0, ("cpu",)),
        (("auto",), 2, ("cuda:0", "cuda:1")),
        (("cpu",), 2, ("cpu",)),
        (("cuda",), 3, ("cuda:0", "cuda:1", "cuda:2")),
        (("cuda",), 0, ("cuda:0",)),
        (("cuda:1",), 2, ("cuda:1",)),
        (("cuda:1", "cuda:0"), 2, ("cuda:1", "cuda:0")),
    ],
)
def test_the_plan_resolves_auto_and_cuda_to_the_visible_gpus(
    requested: tuple[str, ...], gpus: int, devices: tuple[str, ...]
) -> None:
    plan = place(requested, 2, gpus)
    assert plan.devices == devices
    assert plan.size == 2 * len(devices)
    assert plan.on_cuda == (devices != ("cpu",))


def test_instances_are_per_device_and_interleaved_over_the_devices() -> None:
    plan = place(("cuda",), 3, 2)
    assert plan.instances == (
        InstancePlace("cuda:0", 0),
        InstancePlace("cuda:1", 0),
        InstancePlace("cuda:0", 1),
        InstancePlace("cuda:1", 1),
        InstancePlace("cuda:0", 2),
        InstancePlace("cuda:1", 2),
    )
    assert place(("cpu",), 4, 2).instances == tuple(InstancePlace("cpu", n) for n in range(4))


def test_missing_names_the_gpus_this_process_cannot_see() -> None:
    assert place(("cuda:0", "cuda:3"), 1, 2).missing(2) == ("cuda:3",)
    assert place(("cuda",), 1, 0).missing(0) == ("cuda:0",)
    assert place(("cuda",), 1, 2).missing(2) == ()
    assert place(("cpu",), 1, 0).missing(0) == ()
    with pytest.raises(ValueError, match="at least 1"):
        place(("cpu",), 0, 0)
