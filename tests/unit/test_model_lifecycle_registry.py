"""A model's life in the registry when things go wrong: a tenant's broken tuned variant
beside the shared model, a load that never finishes, calls that outlive the versions
they were routed to, and callers that give up on an unload."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mandant.config import ModelSpec, parse_config
from mandant.errors import ModelNotFound, Unavailable
from mandant.registry import Model, ModelRegistry
from mandant.scheduling.direct import DirectScheduler
from mandant.types import Tenant
from tests.fakes import FakeBackend, GatedBackend, request, settle

IO = {
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, 4]}],
}
ACME, GLOBEX = Tenant("acme"), Tenant("globex")


class _Backend(FakeBackend):
    """Fails to start where its weights are ``broken*``, never starts where ``hang*``."""

    async def start(self) -> None:
        name = self.spec.path.name if self.spec and self.spec.path else ""
        if name.startswith("broken"):
            raise RuntimeError(f"cannot read /secret/{name}")
        if name.startswith("hang"):
            await asyncio.Event().wait()


def _specs(*models: dict[str, Any]) -> list[ModelSpec]:
    config = parse_config({"tenants": [{"id": "acme"}, {"id": "globex"}], "models": models})
    return list(config.model_specs(Path("/models")))


def _shared(path: str, name: str = "m") -> dict[str, Any]:
    return {"name": name, "factory": "x:y", "path": path, **IO}


def _variant(path: str, tenant: str = "globex") -> dict[str, Any]:
    return {"tenant": tenant, "base": "m", "path": path}


def _registry(*models: dict[str, Any], grace_s: float = 30.0, **options: Any) -> ModelRegistry:
    return ModelRegistry(
        _specs(*models),
        _Backend,
        lambda spec, backend: DirectScheduler(backend, spec.name),
        grace_s=grace_s,
        **options,
    )


def _path(registry: ModelRegistry, tenant: Tenant, name: str = "m") -> str:
    model = registry.resolve(tenant, name)
    assert model.spec.path is not None
    return model.spec.path.name


async def _until_closed(model: Model) -> None:
    for _ in range(1000):
        if not model.backend.ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{model.key} was never closed")


# -- a tenant's broken variant and the shared model ----------------------------------


async def test_a_broken_variant_added_with_its_base_leaves_the_base_serving_the_others() -> None:
    """A reload adds a shared model and globex's variant, which fails to load: the base
    serves every other tenant, globex's variant is listed failed (as at start-up); it
    took the shared model away from everyone (NOT_FOUND, not listed)."""
    registry = _registry(_shared("other.pt", name="other"))
    await registry.start()
    changes = await registry.apply(
        _specs(_shared("other.pt", name="other"), _shared("base.pt"), _variant("broken.pt"))
    )
    (change,) = changes
    assert change.startswith("model 'm' partly loaded: model 'm' version 1 of tenant 'globex'")
    assert "cannot read /secret/broken.pt" in change
    assert _path(registry, ACME) == "base.pt" and registry.resolve(ACME, "m").ready
    variant = registry.resolve(GLOBEX, "m")
    assert not variant.ready and variant.failure is not None
    assert variant.reason == "failed to load; the operator's log has the cause"
    assert [m.key.name for m in registry.visible(ACME)] == ["m", "other"]


async def test_the_shared_model_updates_while_a_tenants_variant_fails_to() -> None:
    """load_model after the base changed: acme gets the new base although globex's new
    variant fails (globex's broken artifact blocked the shared model's update); globex
    keeps the variant it had, and the answer names globex's version."""
    registry = _registry(_shared("one.pt"), _variant("globex-one.pt"))
    await registry.start()
    with pytest.raises(Unavailable) as failed:
        await registry.load("m", _specs(_shared("two.pt"), _variant("broken.pt")))
    assert "model 'm' version 1 of tenant 'globex' failed to load" in str(failed.value)
    assert "(the versions serving stay)" in str(failed.value)
    assert _path(registry, ACME) == "two.pt"
    assert _path(registry, GLOBEX) == "globex-one.pt" and registry.resolve(GLOBEX, "m").ready


async def test_a_shared_model_made_private_that_fails_to_load_is_listed_failed() -> None:
    """A reload makes the shared ``m`` acme's own, whose load fails. The shared versions
    go (the file no longer has them), so nothing serves acme: its version is listed
    failed, as at start-up. It was counted as served by the shared versions, so it was
    neither routed nor listed (NOT_FOUND for acme too) while the change said the
    versions serving stayed."""
    registry = _registry(_shared("base.pt"))
    await registry.start()
    (change,) = await registry.apply(_specs({**_shared("broken.pt"), "tenant": "acme"}))
    assert "failed to load" in change and "versions serving stay" not in change
    mine = registry.resolve(ACME, "m")
    assert not mine.ready and mine.failure is not None
    with pytest.raises(ModelNotFound):
        registry.resolve(GLOBEX, "m")


async def test_a_failed_load_leaves_the_other_owners_versions_as_they_were() -> None:
    """A load of only the shared entry that fails keeps the shared versions, as its
    answer says, and globex's tuned variant too: it took the variant away (globex was
    served the old base) while answering that the versions serving stay. A load that
    succeeds still replaces every owner's versions (the documented semantics)."""
    registry = _registry(_shared("one.pt"), _variant("globex-one.pt"))
    await registry.start()
    with pytest.raises(Unavailable, match="versions serving stay"):
        await registry.load("m", _specs(_shared("broken.pt")))
    assert _path(registry, ACME) == "one.pt"
    assert _path(registry, GLOBEX) == "globex-one.pt"
    await registry.load("m", _specs(_shared("two.pt")))
    assert _path(registry, ACME) == _path(registry, GLOBEX) == "two.pt"


async def test_a_reload_retrying_a_broken_variant_leaves_the_shared_versions_alone() -> None:
    registry = _registry(_shared("base.pt"), _variant("broken.pt"))
    await registry.start()
    shared = registry.resolve(ACME, "m")
    (change,) = await registry.apply(_specs(_shared("base.pt"), _variant("broken.pt")))
    assert change.startswith("model 'm' not loaded: model 'm' version 1 of tenant 'globex'")
    assert registry.resolve(ACME, "m") is shared and shared.ready  # not restarted
    await registry.apply(_specs(_shared("base.pt"), _variant("fixed.pt")))
    assert _path(registry, GLOBEX) == "fixed.pt" and registry.resolve(GLOBEX, "m").ready
    assert registry.resolve(ACME, "m") is shared


async def test_a_reload_removing_a_variant_leaves_the_shared_versions_alone() -> None:
    registry = _registry(_shared("base.pt"), _variant("globex.pt"))
    await registry.start()
    shared = registry.resolve(ACME, "m")
    changes = await registry.apply(_specs(_shared("base.pt")))
    assert changes == ["model 'm' changed; the versions of tenant 'globex' unloaded"]
    assert registry.resolve(GLOBEX, "m") is shared is registry.resolve(ACME, "m")


async def test_a_failed_load_keeps_a_version_that_is_only_not_ready_now() -> None:
    """The version serving is not ready at the moment (its Triton restarts) and the
    new one fails to load: the old one stays, to come back on its own (the failed one
    replaced it, and the model stayed down until another load)."""
    registry = _registry(_shared("one.pt"))
    await registry.start()
    old = registry.resolve(ACME, "m")
    assert old.ready  # it served
    old.backend._ready = False  # type: ignore[attr-defined]  # its backend went away
    with pytest.raises(Unavailable, match="the versions serving stay"):
        await registry.load("m", _specs(_shared("broken.pt")))
    assert registry.resolve(ACME, "m") is old


# -- a load that never finishes --------------------------------------------------------


async def test_a_load_still_running_after_the_timeout_fails_and_frees_the_name() -> None:
    registry = _registry(_shared("one.pt"), _shared("hang.pt", name="stuck"), load_timeout_s=0.2)
    await asyncio.wait_for(registry.start(), 10)  # start-up does not hang on it either
    assert _path(registry, ACME) == "one.pt"
    stuck = registry.resolve(ACME, "stuck")
    assert stuck.failure is not None and "still loading after 0.2 s" in stuck.failure
    with pytest.raises(Unavailable, match=r"still loading after 0\.2 s"):
        await asyncio.wait_for(registry.load("m", _specs(_shared("hang-two.pt"))), 10)
    assert _path(registry, ACME) == "one.pt"  # the version serving stays
    await asyncio.wait_for(registry.unload("m"), 10)  # the name's turn was given back
    with pytest.raises(ModelNotFound):
        registry.resolve(ACME, "m")


# -- calls that outlive their version, callers that give up ----------------------------


async def test_a_reload_does_not_wait_for_calls_on_the_versions_it_replaced() -> None:
    """A call still running on a replaced version held up the reload's changes (and
    every later reload's) until it answered."""
    registry = _registry(_shared("one.pt"))
    await registry.start()
    old = registry.resolve(ACME, "m")
    old.enter()  # a call in progress; grace_s is 30 s
    changes = await asyncio.wait_for(registry.apply(_specs(_shared("two.pt"))), 10)
    assert changes == ["model 'm' loaded"] and _path(registry, ACME) == "two.pt"
    await settle()
    assert old.backend.ready  # freed only once its call answered
    old.leave()
    await _until_closed(old)


async def test_an_unload_the_caller_gave_up_on_still_frees_the_old_version() -> None:
    registry = _registry(_shared("one.pt"))
    await registry.start()
    old = registry.resolve(ACME, "m")
    old.enter()
    unload = asyncio.create_task(registry.unload("m"))
    await settle()
    unload.cancel()  # the admin's client went away while the call ran
    with pytest.raises(asyncio.CancelledError):
        await unload
    with pytest.raises(ModelNotFound):
        registry.resolve(ACME, "m")
    old.leave()
    await _until_closed(old)


async def test_an_unload_with_a_call_stuck_in_the_model_answers_the_queued_ones() -> None:
    """grace_s passes with a call stuck in an unbatched model and two queued behind
    it: those two answer Unavailable, the unload answers, and the stuck call answers
    when the model lets it go."""
    backend = GatedBackend()
    registry = ModelRegistry(
        _specs(_shared("one.pt")),
        lambda spec: backend,
        lambda spec, backend: DirectScheduler(backend, spec.name),
        grace_s=0.2,
    )
    await registry.start()
    model = registry.resolve(ACME, "m")

    async def call(value: float) -> Any:
        model.enter()  # as the data plane does
        try:
            return await model.scheduler.submit(request(value=value))
        finally:
            model.leave()

    stuck = asyncio.create_task(call(1))
    await settle()
    queued = [asyncio.create_task(call(v)) for v in (2, 3)]
    await settle()
    await asyncio.wait_for(registry.unload("m"), 10)
    for task in queued:
        with pytest.raises(Unavailable, match="model 'm' is shutting down"):
            await asyncio.wait_for(task, 10)
    assert not stuck.done()
    backend.release()
    assert float((await asyncio.wait_for(stuck, 10))["OUT0"][0, 0]) == 2
