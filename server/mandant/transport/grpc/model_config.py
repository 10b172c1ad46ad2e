"""A model as Triton's ``ModelConfig`` (``protos/model_config.proto``), for the
ModelConfig RPC.

Triton's conventions, which tritonclient and perf_analyzer rely on:

* ``max_batch_size`` is 0 for a model without batching, and its ``dims`` are the whole
  shape a request sends (the batch dimension included); with batching, ``dims`` leave
  the batch dimension out and ``max_batch_size`` bounds it.
* Data types are ``TYPE_*`` names; v2's BYTES is Triton's ``TYPE_STRING``.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from mandant.config import ModelSpec, VersionPolicyConfig
from mandant.registry import Model
from mandant.types import DATATYPES, TensorSpec
from mandant_client._proto import model_config_pb2 as mc

#: v2 datatype name → Triton's ``DataType`` name, for every datatype Mandant knows.
TRITON_DATATYPES: dict[str, str] = {
    name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DATATYPES
}

_GPU = re.compile(r"^cuda(?::(\d+))?$")


@runtime_checkable
class RunsOnDevice(Protocol):
    """A backend that knows where its model runs (``("cpu",)``, ``("cuda:0", "cuda:1")`` …)."""

    @property
    def devices(self) -> tuple[str, ...]: ...


def model_config(model: Model) -> mc.ModelConfig:
    """``model``'s configuration."""
    spec = model.spec
    batched = spec.batching is not None
    config = mc.ModelConfig(
        name=model.key.name,
        platform=model.backend.platform,
        backend=spec.backend,
        version_policy=_version_policy(spec.version_policy),
        max_batch_size=spec.batching.max_batch_size if spec.batching is not None else 0,
        input=[
            mc.ModelInput(
                name=t.name, data_type=TRITON_DATATYPES[t.datatype], dims=_dims(t, batched)
            )
            for t in spec.inputs
        ],
        output=[
            mc.ModelOutput(
                name=t.name, data_type=TRITON_DATATYPES[t.datatype], dims=_dims(t, batched)
            )
            for t in spec.outputs
        ],
        instance_group=[_instance_group(model, spec)],
    )
    if spec.batching is not None:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=spec.batching.preferred_batch_sizes,
                max_queue_delay_microseconds=round(spec.batching.max_queue_delay_ms * 1000),
            )
        )
    return config


def _version_policy(policy: VersionPolicyConfig) -> mc.ModelVersionPolicy:
    """The model's configured ``version_policy`` in Triton's message."""
    if policy.latest is not None:
        return mc.ModelVersionPolicy(
            latest=mc.ModelVersionPolicy.Latest(num_versions=policy.latest)
        )
    if policy.specific is not None:
        return mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=sorted(policy.specific))
        )
    return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())


def _dims(tensor: TensorSpec, batched: bool) -> tuple[int, ...]:
    return tensor.shape[1:] if batched else tensor.shape


def _instance_group(model: Model, spec: ModelSpec) -> mc.ModelInstanceGroup:
    """``spec.instances`` copies on each device the backend picked (the configured ones
    where it does not say: ``auto`` stays KIND_AUTO, ``cuda`` lists no GPU: all)."""
    devices = model.backend.devices if isinstance(model.backend, RunsOnDevice) else spec.devices
    group = mc.ModelInstanceGroup(name=model.key.name, count=spec.instances)
    gpus = [_GPU.match(device) for device in devices]
    if all(gpu is not None for gpu in gpus):
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        group.gpus.extend(int(gpu.group(1)) for gpu in gpus if gpu is not None and gpu.group(1))
    elif devices == ("cpu",):
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    return group
