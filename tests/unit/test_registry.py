"""The three tenancy patterns and version resolution, without gRPC or torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mandant.config import ModelSpec, parse_config
from mandant.errors import ModelNotFound
from mandant.registry import ModelRegistry
from mandant.scheduling.direct import DirectScheduler
from mandant.types import Tenant
from tests.fakes import FakeBackend

IO = {
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, 4]}],
}
ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")


def _registry(models: list[dict[str, Any]], not_ready: set[str] = frozenset()) -> ModelRegistry:  # type: ignore[assignment]
    config = parse_config(
        {"tenants": [{"id": t.id} for t in (ACME, GLOBEX, INITECH)], "models": models}
    )

    def backend(spec: ModelSpec) -> FakeBackend:
        return FakeBackend(spec, ready=f"{spec.tenant}/{spec.name}:{spec.version}" not in not_ready)

    return ModelRegistry(
        config.model_specs(Path("/models")), backend, lambda s, b: DirectScheduler(b)
    )


DEMO = [
    {"name": "classifier", "factory": "m:f", "path": "base.pt", **IO},
    {"tenant": "globex", "base": "classifier", "path": "globex.pt"},
    {"name": "fraud", "tenant": "acme", "path": "fraud.pt", **IO},
]


def test_shared_model_is_visible_to_everyone() -> None:
    registry = _registry(DEMO)
    for tenant in (ACME, INITECH):
        model = registry.resolve(tenant, "classifier")
        assert model.key.owner is None and model.spec.path == Path("/models/base.pt")


def test_tuned_variant_replaces_the_base_for_its_tenant_only() -> None:
    registry = _registry(DEMO)
    tuned = registry.resolve(GLOBEX, "classifier")
    assert tuned.key.owner == "globex"
    assert tuned.spec.path == Path("/models/globex.pt")
    assert tuned.spec.factory == "m:f" and tuned.spec.inputs[0].name == "X"  # inherited
    assert registry.resolve(ACME, "classifier") is not tuned


def test_private_model_does_not_exist_for_others() -> None:
    registry = _registry(DEMO)
    assert registry.resolve(ACME, "fraud").key.owner == "acme"
    for tenant in (GLOBEX, INITECH):
        with pytest.raises(ModelNotFound) as err:
            registry.resolve(tenant, "fraud")
        with pytest.raises(ModelNotFound) as unknown:
            registry.resolve(tenant, "never-defined")
        assert str(err.value) == str(unknown.value).replace("never-defined", "fraud")


def test_visible_lists_names_as_the_tenant_calls_them() -> None:
    registry = _registry(DEMO)
    assert [(m.key.name, m.key.owner) for m in registry.visible(ACME)] == [
        ("classifier", None),
        ("fraud", "acme"),
    ]
    assert [(m.key.name, m.key.owner) for m in registry.visible(GLOBEX)] == [
        ("classifier", "globex")
    ]


def test_newest_ready_version_by_default_and_exact_version_on_request() -> None:
    models = [{"name": "m", "version": v, "factory": "x:y", **IO} for v in (1, 2, 10)]
    registry = _registry(models, not_ready={"None/m:10"})
    assert registry.resolve(ACME, "m").key.version == "2"  # 10 is newest but not ready
    assert registry.resolve(ACME, "m", "10").key.version == "10"
    assert registry.resolve(ACME, "m", "1").key.version == "1"
    with pytest.raises(ModelNotFound, match="model 'm' version '3' not found"):
        registry.resolve(ACME, "m", "3")
    assert [m.key.version for m in registry.versions(ACME, "m")] == ["10", "2", "1"]


def test_a_version_of_any_length_is_read_as_triton_reads_it() -> None:
    """ "01" is 1; 5,000 digits are a version that does not exist (int() refused
    them: INTERNAL on every RPC that names a version)."""
    models = [{"name": "m", "version": v, "factory": "x:y", **IO} for v in (1, 2)]
    registry = _registry(models)
    assert registry.resolve(ACME, "m", "0002").key.version == "2"
    with pytest.raises(ModelNotFound, match="version '1111"):
        registry.resolve(ACME, "m", "1" * 5000)
    with pytest.raises(ModelNotFound, match="version '0' not found"):
        registry.resolve(ACME, "m", "000")


def test_another_tenants_version_is_not_found_either() -> None:
    registry = _registry(DEMO)
    with pytest.raises(ModelNotFound):
        registry.resolve(GLOBEX, "fraud", "1")
