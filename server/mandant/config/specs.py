""":class:`ModelSpec`, a model version after inheritance from its base (everything a
backend needs), and how model entries resolve into specs: each model's version policy
and the versions it serves, a tuned variant's settings filled in from its base, its
placement, and paths made absolute."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import field_validator

from mandant.config._base import _Frozen
from mandant.config.models import (
    SERVE_ALL,
    BatchingConfig,
    ModelConfig,
    TritonModelConfig,
    VersionPolicyConfig,
    WarmupConfig,
    check_devices,
)
from mandant.types import TensorSpec


class ModelSpec(_Frozen):
    """A model after inheritance from its base: everything a backend needs."""

    name: str
    version: str
    tenant: str | None
    backend: Literal["torch", "triton"]
    path: Path | None
    factory: str | None
    factory_args: Mapping[str, Any]
    weights_init: str | None
    #: The placement asked for (see :func:`check_devices`); ``instances`` per device.
    devices: tuple[str, ...]
    instances: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig | None
    triton: TritonModelConfig | None
    version_policy: VersionPolicyConfig = SERVE_ALL
    warmup: tuple[WarmupConfig, ...] = ()
    #: Measured-cheap calls may run on the event loop (``models[].inline: auto``).
    inline: bool = True

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_devices(value)

    # Read on every call: built once per spec (it is frozen; a changed copy made with
    # model_copy computes its own, see below).
    @cached_property
    def inputs_by_name(self) -> Mapping[str, TensorSpec]:
        return {t.name: t for t in self.inputs}

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy whose cached values are computed afresh from its own fields
        (pydantic copies them with the rest of the instance's ``__dict__``)."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("inputs_by_name", None)
        copy.__dict__.pop("output_names", None)
        return copy


def _version_policies(
    models: Sequence[ModelConfig],
) -> dict[tuple[str | None, str], tuple[VersionPolicyConfig, set[str]]]:
    """Each model's (owner, name) → its policy and the versions it serves."""
    versions: dict[tuple[str | None, str], list[str]] = {}
    policies: dict[tuple[str | None, str], VersionPolicyConfig] = {}
    for model in models:
        key = (model.tenant, model.model_name)
        versions.setdefault(key, []).append(model.version)
        if model.version_policy is not None:
            policies[key] = model.version_policy
    return {
        key: (policy, policy.served(found))
        for key, found in versions.items()
        for policy in (policies.get(key, SERVE_ALL),)
    }


def _bases(models: Sequence[ModelConfig]) -> dict[str, ModelConfig]:
    """Each shared model's entry its tenants' tuned variants (``base:``) inherit from:
    its newest version that its policy serves (else its newest). The last entry listed
    was taken: an older version, or one the policy does not serve, depending on the
    file's order (or a load's JSON's)."""
    policies = _version_policies(models)
    bases: dict[str, ModelConfig] = {}

    def rank(model: ModelConfig) -> tuple[bool, int]:
        return model.version in policies[(None, model.model_name)][1], int(model.version)

    for model in models:
        if model.tenant is None:
            current = bases.get(model.model_name)
            if current is None or rank(model) > rank(current):
                bases[model.model_name] = model
    return bases


def _inherited(model: ModelConfig, base: ModelConfig | None, field: str) -> Any:
    """``model``'s setting of ``field``, else (a tuned variant) its ``base``'s."""
    own = getattr(model, field)
    return own if own is not None or base is None else getattr(base, field)


def _resolve(
    model: ModelConfig,
    base: ModelConfig | None,
    base_dir: Path,
    version_policy: VersionPolicyConfig = SERVE_ALL,
) -> ModelSpec:
    def pick(field: str) -> Any:
        return _inherited(model, base, field)

    backend: Literal["torch", "triton"] = pick("backend") or "torch"
    inputs, outputs = pick("inputs"), pick("outputs")
    if backend == "torch":
        if inputs is None or outputs is None:
            raise ValueError("torch models declare their inputs and outputs")
        if pick("path") is None and pick("factory") is None:
            raise ValueError("torch models need a 'path' (TorchScript or weights) or a 'factory'")
    if backend == "triton" and pick("triton") is None:
        raise ValueError("triton models need a 'triton: {url, model}' section")
    if pick("batching") is not None:
        fixed = [t.name for t in (*(inputs or ()), *(outputs or ())) if t.shape[:1] != (-1,)]
        if fixed:  # batches of several requests failed their output check, every one
            raise ValueError(
                "a batched model's inputs and outputs have the batch as their first "
                f"dimension, -1: not {', '.join(fixed[:4])}"
            )
    path = pick("path")
    return ModelSpec(
        name=model.model_name,
        version=model.version,
        tenant=model.tenant,
        backend=backend,
        path=(base_dir / path) if path is not None else None,
        factory=pick("factory"),
        factory_args=dict(pick("factory_args") or {}),
        weights_init=pick("weights_init"),
        devices=_placement(model, base),
        instances=pick("instances") or 1,
        inputs=tuple(t.spec() for t in inputs or ()),
        outputs=tuple(t.spec() for t in outputs or ()),
        batching=pick("batching"),
        triton=pick("triton"),
        version_policy=version_policy,
        warmup=pick("warmup") or (),
        inline=pick("inline") != "never",
    )


def _placement(model: ModelConfig, base: ModelConfig | None) -> tuple[str, ...]:
    """A tuned variant that names a device (either key) replaces its base's placement."""
    for source in (model, base):
        if source is not None and source.devices is not None:
            return source.devices
        if source is not None and source.device is not None:
            return (source.device,)
    return ("auto",)
