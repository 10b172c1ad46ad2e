"""A model's spec as Triton's ModelConfig: Triton's batch-dimension convention, data
types, the batching section, instance groups and version policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mandant.config import ModelSpec, parse_config
from mandant.registry import Model, ModelRegistry
from mandant.scheduling.direct import DirectScheduler
from mandant.transport.grpc.model_config import TRITON_DATATYPES, model_config
from mandant.types import DATATYPES, Tenant
from mandant_client._proto import model_config_pb2 as mc
from tests.fakes import FakeBackend

ACME = Tenant("acme")


class DeviceBackend(FakeBackend):
    """A backend that says where it runs (as the torch backend does)."""

    devices = ("cuda:1",)


def _models(*models: dict[str, Any], backend: type[FakeBackend] = FakeBackend) -> ModelRegistry:
    config = parse_config({"tenants": [{"id": "acme"}], "models": list(models)})

    def make(spec: ModelSpec) -> FakeBackend:
        return backend(spec)

    return ModelRegistry(config.model_specs(Path("/m")), make, lambda s, b: DirectScheduler(b))


def _config(registry: ModelRegistry, name: str) -> mc.ModelConfig:
    model: Model = registry.resolve(ACME, name)
    return model_config(model)


def _entry(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "factory": "m:f",
        "inputs": [{"name": "IN", "datatype": "BYTES", "shape": [-1, 3, -1]}],
        "outputs": [{"name": "OUT", "datatype": "INT64", "shape": [-1, 2]}],
        **extra,
    }


def test_every_v2_datatype_has_a_triton_type() -> None:
    assert set(TRITON_DATATYPES) == set(DATATYPES)
    assert set(TRITON_DATATYPES.values()) <= set(mc.DataType.keys())
    assert TRITON_DATATYPES["BYTES"] == "TYPE_STRING"
    assert TRITON_DATATYPES["FP32"] == "TYPE_FP32"


def test_without_batching_dims_keep_the_batch_dimension_and_max_batch_size_is_0() -> None:
    config = _config(_models(_entry("plain", device="cpu", instances=3)), "plain")
    assert config.name == "plain" and config.backend == "torch"
    assert config.platform == "fake"
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("IN", mc.TYPE_STRING, [-1, 3, -1])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUT", mc.TYPE_INT64, [-1, 2])
    ]
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_CPU, 3, [])


def test_with_batching_dims_drop_the_batch_dimension() -> None:
    batching = {"max_batch_size": 16, "max_queue_delay_ms": 2.5, "preferred_batch_sizes": [4, 8]}
    config = _config(_models(_entry("batched", batching=batching)), "batched")
    assert config.max_batch_size == 16
    assert [list(t.dims) for t in config.input] == [[3, -1]]
    assert [list(t.dims) for t in config.output] == [[2]]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500


def test_instance_group_is_on_the_device_the_backend_runs_on() -> None:
    config = _config(_models(_entry("gpu", instances=2), backend=DeviceBackend), "gpu")
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 2, [1])
    auto = _config(_models(_entry("auto")), "auto").instance_group[0]
    assert auto.kind == mc.ModelInstanceGroup.KIND_AUTO


class TwoGpuBackend(FakeBackend):
    devices = ("cuda:0", "cuda:2")


def test_instance_group_lists_every_gpu_the_instances_are_on() -> None:
    config = _config(_models(_entry("gpus", instances=3), backend=TwoGpuBackend), "gpus")
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (
        mc.ModelInstanceGroup.KIND_GPU,
        3,
        [0, 2],
    )
    # A backend that does not say: the configured placement ("cuda" is every GPU).
    listed = _config(_models(_entry("listed", devices=["cuda:1", "cuda:3"])), "listed")
    assert list(listed.instance_group[0].gpus) == [1, 3]
    every = _config(_models(_entry("every", device="cuda")), "every").instance_group[0]
    assert (every.kind, list(every.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, [])


def test_version_policy_is_the_configured_one() -> None:
    """The default (no ``version_policy``) serves every configured version: ``all``."""
    config = _config(_models(_entry("m", version=1), _entry("m", version=3)), "m")
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    latest = {"latest": 2}
    registry = _models(*(_entry("m", version=v, version_policy=latest) for v in (1, 2, 3)))
    policy = _config(registry, "m").version_policy
    assert policy.WhichOneof("policy_choice") == "latest"
    assert policy.latest.num_versions == 2
    specific = {"specific": [3, 1]}
    registry = _models(*(_entry("m", version=v, version_policy=specific) for v in (1, 2, 3)))
    policy = _config(registry, "m").version_policy
    assert list(policy.specific.versions) == [1, 3]
