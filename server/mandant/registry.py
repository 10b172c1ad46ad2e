"""Models by (owner, name, version), and the three tenancy patterns:

* shared (``owner is None``): every tenant may call it;
* private (``owner == tenant``, no base): exists for its tenant only;
* tuned (``owner == tenant`` with a base): its tenant reaches it under the base's
  name, everyone else gets the base.

Resolution looks at the caller's own models under a name first, then the shared
ones. A model another tenant owns is indistinguishable from one that does not
exist: same error, same message.

A version is ready once its backend started and its warm-up requests (``warmup``)
ran; until then it gets no traffic. A model that fails to load (a failing warm-up
included) stays listed, not ready, with its ``failure`` (the reason);
the others serve. ``load`` starts a name's versions from the configuration beside the
old ones and switches once every one is ready; ``unload`` stops routing a name, lets
the calls that reached it finish (``Model.enter``/``leave``), then frees it.

Changes to one name (a load, an unload, a reload's decision for it) take effect one at
a time, in the order they were asked for: an unload asked while a load of that name is
starting waits for it and then unloads, so a load that started earlier can never undo
a change that was answered after it. Freeing the old versions (waiting for their
calls) is not part of a change: the next one need not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mandant.backends.base import Backend, DescribesModel
from mandant.config import ModelSpec
from mandant.errors import InvalidInput, MandantError, ModelNotFound, Unavailable
from mandant.scheduling.base import Scheduler
from mandant.types import ModelKey, Tenant
from mandant.warmup import warm_up

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Model:
    key: ModelKey
    declared: ModelSpec
    backend: Backend
    scheduler: Scheduler
    describer: DescribesModel | None = field(init=False, default=None, repr=False)
    #: Why it failed to load (shown in RepositoryIndex); ``None`` once loaded.
    failure: str | None = field(init=False, default=None)
    #: Its backend started and its ``warmup`` requests are running: not ready yet.
    warming: bool = field(init=False, default=False)
    #: Calls that resolved this model and have not answered yet.
    calls: int = field(init=False, default=0)
    _idle: asyncio.Event | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.backend, DescribesModel):
            self.describer = self.backend

    @property
    def spec(self) -> ModelSpec:
        """The configured spec, or the backend's where it discovers its tensors (Triton)."""
        return self.describer.spec if self.describer is not None else self.declared

    @property
    def ready(self) -> bool:
        return self.failure is None and not self.warming and self.backend.ready

    @property
    def state(self) -> str:
        """RepositoryIndex's state: ``READY`` or ``UNAVAILABLE``."""
        return "READY" if self.ready else "UNAVAILABLE"

    def enter(self) -> None:
        """A call resolved this model (the data plane pairs it with :meth:`leave`)."""
        self.calls += 1

    def leave(self) -> None:
        self.calls -= 1
        if self.calls == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, grace_s: float) -> None:
        """Wait until every call that reached this model answered, at most ``grace_s``."""
        if self.calls:
            if self._idle is None:  # one event for every retire waiting on this model
                self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)

    async def aclose(self) -> None:
        """Free it: queued calls still there answer Unavailable (the scheduler's aclose)."""
        await self.scheduler.aclose()
        await self.backend.aclose()


BackendFactory = Callable[[ModelSpec], Backend]
SchedulerFactory = Callable[[ModelSpec, Backend], Scheduler]
#: The specs of a model's versions for ``load(name, config)``: as configured now (the
#: file, re-read), or as ``config`` (a JSON model entry) gives them.
SpecSource = Callable[[str, str | None], Sequence[ModelSpec]]
#: Told of each model version that failed to load, with the reason.
FailureHook = Callable[[ModelKey, str], None]
#: Told when replaced or unloaded model versions have been freed.
RetiredHook = Callable[[], object]


class ModelRegistry:
    def __init__(
        self,
        specs: Iterable[ModelSpec],
        backend_factory: BackendFactory,
        scheduler_factory: SchedulerFactory,
        spec_source: SpecSource | None = None,
        on_failure: FailureHook | None = None,
        grace_s: float = 30.0,
        names: set[str] | None = None,
        on_retired: RetiredHook | None = None,
    ) -> None:
        """``grace_s``: how long an unloaded or replaced model waits for its calls;
        ``names``: a set this registry adds every model name it loads to (metrics label
        these names only, so a model added later gets its own series); ``on_retired``:
        called once replaced or unloaded versions are closed (a serving process gives
        their memory back to the collector then, ``heap.py``)."""
        self._backend_factory = backend_factory
        self._scheduler_factory = scheduler_factory
        self._initial = list(specs)
        self._spec_source: SpecSource = spec_source or self._initial_specs
        self._on_failure = on_failure
        self._on_retired = on_retired
        self.grace_s = grace_s
        #: Every model name this registry built a model for (configured names only).
        self.names = names if names is not None else set()
        self._models: dict[tuple[str | None, str], list[Model]] = {}
        #: name → (the lock its changes take in turn, how many hold or await it)
        self._changing: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._install(self._build(spec) for spec in self._initial)

    def _initial_specs(self, name: str, config: str | None) -> list[ModelSpec]:
        if config is not None:
            raise InvalidInput("this server loads models from its configuration only")
        return [spec for spec in self._initial if spec.name == name]

    def _build(self, spec: ModelSpec) -> Model:
        self.names.add(spec.name)
        backend = self._backend_factory(spec)
        key = ModelKey(spec.name, spec.version, spec.tenant)
        return Model(key, spec, backend, self._scheduler_factory(spec, backend))

    def _install(self, models: Iterable[Model]) -> None:
        for model in models:
            self._models.setdefault((model.key.owner, model.key.name), []).append(model)
        for versions in self._models.values():
            versions.sort(key=lambda m: int(m.key.version), reverse=True)

    def all(self) -> list[Model]:
        return [model for versions in self._models.values() for model in versions]

    async def start(self) -> None:
        """Load every model; one that fails is kept, not ready, with its reason."""
        await self._start_all(self.all())

    async def _start_all(self, models: Sequence[Model], require_ready: bool = False) -> list[Model]:
        """Start ``models`` at once; the ones that failed (closed, reason recorded).
        ``require_ready``: a model whose backend is not ready once started fails too
        (a Triton that does not answer), where it would replace versions serving."""
        results = await asyncio.gather(
            *(self._start_one(model, require_ready) for model in models),
            return_exceptions=True,
        )
        failed = []
        for model, result in zip(models, results, strict=True):
            if result is None:
                continue
            model.failure = f"failed to load: {type(result).__name__}: {result}"[:1000]
            logger.error("model %s %s", model.key, model.failure)
            if self._on_failure is not None:
                self._on_failure(model.key, model.failure)
            with contextlib.suppress(Exception):
                await model.aclose()
            failed.append(model)
        return failed

    @staticmethod
    async def _start_one(model: Model, require_ready: bool) -> None:
        model.warming = True
        await model.backend.start()
        if require_ready and not model.backend.ready:
            raise Unavailable("its backend is not ready")
        await warm_up(model.backend, model.declared.warmup)
        await model.scheduler.start()
        model.warming = False
        logger.info("model %s loaded (%s)", model.key, model.backend.platform)

    async def load(
        self, name: str, specs: Sequence[ModelSpec] | None = None, config: str | None = None
    ) -> None:
        """(Re)load every version of ``name`` from the configuration, ``config`` (a
        JSON model entry, see ``SpecSource``) or ``specs``: started and warmed up
        beside the old ones, switched to at once when all are ready, the old ones freed
        once their calls answered. If one fails, the old ones stay and Unavailable says
        why."""
        async with self._change(name):
            old = await self._switch(name, specs, config)
        await self._retire(old)

    async def unload(self, name: str) -> None:
        """Stop routing ``name`` (new calls: NOT_FOUND), let calls already routed to
        it finish (at most ``grace_s``), then free it."""
        async with self._change(name):
            old = self._remove(name)
        if not old:
            raise ModelNotFound(name)
        logger.info("model %s unloading: %d version(s)", name, len(old))
        await self._retire(old)

    async def apply(self, specs: Iterable[ModelSpec]) -> list[str]:
        """Bring the models to ``specs`` (a reloaded configuration): names no longer
        there are unloaded; new names, changed entries and models that had failed to
        load are loaded (each as :meth:`load`), each decided once the changes to that
        name asked for before are done. Returns one line per change."""
        wanted: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            wanted.setdefault(spec.name, []).append(spec)
        names = sorted(wanted.keys() | {model.key.name for model in self.all()})

        async def bring(name: str) -> str | None:
            group = wanted.get(name)
            async with self._change(name):
                running = [model for model in self.all() if model.key.name == name]
                if group is None:
                    old = self._remove(name)
                    change = f"model '{name}' unloaded" if old else None
                elif (
                    running
                    and _same(group, [m.declared for m in running])
                    and all(m.failure is None for m in running)
                ):
                    return None
                else:
                    try:
                        old = await self._switch(name, group, None)
                    except MandantError as exc:
                        return f"model '{name}' not loaded: {exc}"
                    change = f"model '{name}' loaded"
            await self._retire(old)
            return change

        changes = await asyncio.gather(*(bring(name) for name in names))
        return [change for change in changes if change is not None]

    @contextlib.asynccontextmanager
    async def _change(self, name: str) -> AsyncIterator[None]:
        """Hold ``name``'s turn for a change (module doc); the lock lives only while
        someone holds or awaits it."""
        entry = self._changing.get(name)
        if entry is None:
            entry = self._changing[name] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._changing[name]

    async def _switch(
        self, name: str, specs: Sequence[ModelSpec] | None, config: str | None
    ) -> list[Model]:
        """Start ``name``'s new versions and route to them (:meth:`load`, in its turn);
        the versions they replace, to retire."""
        if specs is None:
            specs = self._spec_source(name, config)
        if not specs:
            raise ModelNotFound(name)
        fresh = [self._build(spec) for spec in specs]
        # Versions serving are replaced only by ready ones (a new Triton URL that does
        # not answer keeps the old); a name not served yet (or by versions not ready
        # either) is routed at once, ready when its backend is (as at start-up).
        serving = any(
            model.ready
            for key, models in self._models.items()
            if key[1] == name
            for model in models
        )
        failed = await self._start_all(fresh, require_ready=serving)
        if failed:
            for model in fresh:
                if model not in failed:
                    await model.aclose()
            raise Unavailable(f"model '{name}' {failed[0].failure}")
        old = self._remove(name)
        self._install(fresh)  # no await since _remove: no call sees the name missing
        logger.info("model %s loaded: %d version(s)", name, len(fresh))
        return old

    def _remove(self, name: str) -> list[Model]:
        keys = [key for key in self._models if key[1] == name]
        return [model for key in keys for model in self._models.pop(key)]

    async def _retire(self, models: Sequence[Model]) -> None:
        await asyncio.gather(*(model.drain(self.grace_s) for model in models))
        for model in models:
            if model.failure is None:
                await model.aclose()
        if models and self._on_retired is not None:
            self._on_retired()

    async def aclose(self) -> None:
        for model in self.all():
            if model.failure is None:
                await model.aclose()

    def versions(self, tenant: Tenant, name: str) -> Sequence[Model]:
        """The versions of ``name`` that ``tenant`` sees, newest first (may be empty)."""
        return self._models.get((tenant.id, name)) or self._models.get((None, name)) or ()

    def resolve(self, tenant: Tenant, name: str, version: str | None = None) -> Model:
        versions = self.versions(tenant, name)
        if not versions:
            raise ModelNotFound(name)
        if version:
            if version.isascii() and version.isdigit():
                version = str(int(version))  # "01" is version 1, as Triton reads it
            for model in versions:
                if model.key.version == version:
                    return model
            raise ModelNotFound(name, version)
        for model in versions:  # the newest ready one, else the newest
            if model.ready:
                return model
        return versions[0]

    def visible(self, tenant: Tenant) -> list[Model]:
        """Every model version ``tenant`` may call, under the names it calls them."""
        names = sorted({name for owner, name in self._models if owner in (None, tenant.id)})
        return [model for name in names for model in self.versions(tenant, name)]


def _same(specs: Sequence[ModelSpec], others: Sequence[ModelSpec]) -> bool:
    def order(spec: ModelSpec) -> tuple[str, int]:
        return (spec.tenant or "", int(spec.version))

    return sorted(specs, key=order) == sorted(others, key=order)
