"""Changes to one model name take effect in the order they were asked for: a load that
is still starting when an unload, a reload or a later load of the same name is asked
for cannot undo it when it finishes (it once did: the last load to finish won, and a
reload that made a model private could be undone by an earlier load of the shared
one). What is served (``served``, what the figures kept per model follow) counts the
retired versions until their calls answered, and a name being changed whole."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
ACME, GLOBEX = Tenant("acme"), Tenant("globex")
T = TypeVar("T")


class _HeldBackend(FakeBackend):
    """Says when it starts, then waits until its spec's path is released (``held``)."""

    def __init__(self, spec: ModelSpec, held: dict[Path, tuple[asyncio.Event, asyncio.Event]]):
        super().__init__(spec)
        self._held = held.get(spec.path) if spec.path is not None else None

    async def start(self) -> None:
        if self._held is not None:
            starting, release = self._held
            starting.set()
            await release.wait()


def _specs(*models: dict[str, Any]) -> list[ModelSpec]:
    config = parse_config({"tenants": [{"id": "acme"}, {"id": "globex"}], "models": models})
    return list(config.model_specs(Path("/models")))


def _model(path: str, **fields: Any) -> dict[str, Any]:
    return {"name": "m", "factory": "x:y", "path": path, **IO, **fields}


class _Registry:
    """A registry whose backends start when the test releases their path."""

    def __init__(self, *models: dict[str, Any]) -> None:
        #: path → (set when a backend of it starts, set to let it start)
        self.held: dict[Path, tuple[asyncio.Event, asyncio.Event]] = {}
        #: Whether "m" was served, each time ``on_unserved`` was awaited.
        self.unserved: list[bool] = []
        self.registry = ModelRegistry(
            _specs(*models),
            lambda spec: _HeldBackend(spec, self.held),
            lambda spec, backend: DirectScheduler(backend),
            grace_s=30.0,
            on_unserved=self._unserved,
        )

    async def _unserved(self) -> None:
        self.unserved.append(self.registry.served().serves("m"))

    def hold(self, path: str) -> asyncio.Event:
        """Hold backends of ``path`` at their start; the event that lets them go."""
        release = asyncio.Event()
        self.held[Path("/models") / path] = (asyncio.Event(), release)
        return release

    async def starting(self, path: str) -> None:
        """Wait until a backend of ``path`` is starting (and held there)."""
        await self.held[Path("/models") / path][0].wait()

    def paths(self, tenant: Tenant) -> Sequence[Path | None]:
        return [model.spec.path for model in self.registry.versions(tenant, "m")]


async def _started(*models: dict[str, Any]) -> _Registry:
    setup = _Registry(*models)
    await setup.registry.start()
    return setup


async def _turns(count: int = 50) -> None:
    """Let the event loop run other tasks for a while (nothing here waits on I/O)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def _during_a_load(setup: _Registry, path: str, change: Awaitable[T]) -> T:
    """Start a load of ``path`` held at its start, ask ``change`` meanwhile (it runs as
    far as it may), then let the load finish; what ``change`` returned."""
    release = setup.hold(path)
    load = asyncio.create_task(setup.registry.load("m", _specs(_model(path))))
    await setup.starting(path)
    asked = asyncio.ensure_future(change)
    await _turns()
    release.set()
    await load
    return await asked


async def test_an_unload_asked_while_a_load_starts_is_not_undone_by_it() -> None:
    setup = await _started(_model("one.pt"))
    await _during_a_load(setup, "two.pt", setup.registry.unload("m"))
    with pytest.raises(ModelNotFound):
        setup.registry.resolve(ACME, "m")


async def test_a_later_load_wins_over_an_earlier_one_that_starts_slower() -> None:
    setup = await _started(_model("one.pt"))
    await _during_a_load(setup, "slow.pt", setup.registry.load("m", _specs(_model("fast.pt"))))
    assert setup.paths(ACME) == [Path("/models/fast.pt")]


async def test_a_reload_that_makes_a_model_private_is_not_undone_by_an_earlier_load() -> None:
    setup = await _started(_model("shared.pt"))
    private = _specs(_model("acme.pt", tenant="acme"))
    changes = await _during_a_load(setup, "shared-again.pt", setup.registry.apply(private))
    assert changes == ["model 'm' loaded; the shared versions unloaded"]
    assert setup.paths(ACME) == [Path("/models/acme.pt")]
    with pytest.raises(ModelNotFound):  # globex never sees acme's model, nor the shared one
        setup.registry.resolve(GLOBEX, "m")


@pytest.mark.parametrize(
    ("before", "after", "loses"),
    [
        ({"tenant": "acme"}, {"tenant": "globex"}, ACME),  # a private model given away
        ({}, {"tenant": "globex"}, ACME),  # a shared model made private
    ],
)
async def test_a_tenant_a_reload_takes_a_model_from_loses_it_at_once(
    before: dict[str, Any], after: dict[str, Any], loses: Tenant
) -> None:
    """Not once the new owner's version has loaded (up to ``model_load_timeout_s``):
    until then it was served, and listed, to a tenant the file no longer gives it to,
    as a revoked key is not. The new owner is served once its version loads."""
    setup = await _started(_model("before.pt", **before))
    release = setup.hold("after.pt")
    reload = asyncio.create_task(setup.registry.apply(_specs(_model("after.pt", **after))))
    await setup.starting("after.pt")
    with pytest.raises(ModelNotFound):
        setup.registry.resolve(loses, "m")
    assert "m" not in [m.key.name for m in setup.registry.visible(loses)]
    release.set()
    await reload
    assert setup.paths(GLOBEX) == [Path("/models/after.pt")]
    with pytest.raises(ModelNotFound):
        setup.registry.resolve(loses, "m")


async def test_a_reload_removing_a_model_is_not_undone_by_a_load_in_progress() -> None:
    other = {**_model("other.pt"), "name": "other"}
    setup = await _started(_model("one.pt"), other)
    changes = await _during_a_load(setup, "two.pt", setup.registry.apply(_specs(other)))
    assert changes == ["model 'm' unloaded"]
    with pytest.raises(ModelNotFound):
        setup.registry.resolve(ACME, "m")


async def test_the_next_change_does_not_wait_for_the_old_versions_calls() -> None:
    setup = await _started(_model("one.pt"))
    serving = setup.registry.resolve(ACME, "m")
    serving.enter()  # a call still in progress on the version being unloaded
    unload = asyncio.create_task(setup.registry.unload("m"))
    await asyncio.sleep(0)
    await setup.registry.load("m", _specs(_model("two.pt")))  # not after the 30 s grace
    assert setup.paths(ACME) == [Path("/models/two.pt")]
    assert not unload.done()  # still waiting for that call
    serving.leave()
    await unload


async def test_an_unloaded_model_is_served_until_its_calls_answered() -> None:
    setup = await _started(_model("one.pt"))
    serving = setup.registry.resolve(ACME, "m")
    serving.enter()
    unload = asyncio.create_task(setup.registry.unload("m"))
    await _turns()
    assert setup.registry.served().serves("m", "", "1")  # its call still counts in it
    assert setup.unserved == []
    serving.leave()
    await unload
    assert setup.unserved == [False]  # told once it is freed, with nothing left of it


async def test_a_name_being_loaded_stays_served_and_a_load_given_up_is_told() -> None:
    setup = await _started({**_model("other.pt"), "name": "other"})
    setup.hold("m.pt")
    load = asyncio.create_task(setup.registry.load("m", _specs(_model("m.pt"))))
    await setup.starting("m.pt")
    assert setup.registry.served().serves("m")  # no key yet: the name, whole
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    await _turns()
    assert not setup.registry.served().serves("m")
    assert setup.unserved == [False]


async def test_versions_freed_while_their_name_loads_again_are_told_when_it_ends() -> None:
    """Unloaded with a call running, loaded again before the call answers: the old
    version is freed while the load holds the name (served whole then), so the hook is
    told again when the load ends, and the old version is no longer served."""
    setup = await _started(_model("one.pt"))
    serving = setup.registry.resolve(ACME, "m")
    serving.enter()
    unload = asyncio.create_task(setup.registry.unload("m"))
    await _turns()
    release = setup.hold("two.pt")
    load = asyncio.create_task(setup.registry.load("m", _specs(_model("two.pt", version="2"))))
    await setup.starting("two.pt")
    serving.leave()  # version 1 is freed now, while version 2 loads
    await unload
    assert setup.unserved == [True]  # told, but "m" is being changed: served whole
    release.set()
    await load
    await _turns()
    assert setup.unserved == [True, True]  # told again once the load ended
    assert not setup.registry.served().serves("m", "", "1")
    assert setup.registry.served().serves("m", "", "2")
