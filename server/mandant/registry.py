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
included, or one still loading after ``load_timeout_s``) stays listed, not ready, with
its ``failure`` (the reason); the others serve. ``load`` starts a name's versions from
the configuration beside the old ones and switches once they are ready; ``unload``
stops routing a name, lets the calls that reached it finish (``Model.enter``/``leave``),
then frees it.

A name's owners switch apart (:meth:`ModelRegistry._switch`): the shared versions and
each tenant's own (a private model, a tuned variant) are replaced when all of that
owner's new versions loaded; an owner whose new versions failed keeps the versions its
tenants are served by now, so one tenant's broken variant never takes the shared model
(or its update) from the others. Where nothing serves an owner's tenants yet, its new
versions are routed at once, failed ones listed with their reason, as at start-up.

Changes to one name (a load, an unload, a reload's decision for it) take effect one at
a time, in the order they were asked for: an unload asked while a load of that name is
starting waits for it and then unloads, so a load that started earlier can never undo
a change that was answered after it. Changes to different names never wait for each
other. Freeing the old versions (waiting for their calls, then closing them) is not
part of a change: it runs in the background, in tasks the registry owns, so neither
the next change nor a reload waits for it, and a caller that gives up on a load or an
unload does not stop it.

What is served (:meth:`ModelRegistry.served`) is what is routed to plus the retired
versions not freed yet. Once versions are freed, or a change leaves its name with
nothing (a load given up), ``on_unserved`` is awaited: whatever keeps figures per
model (metrics, the dashboard, statistics) drops those of what is no longer served,
after the calls of the freed versions answered, so none of them is lost or brings a
dropped figure back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field

from mandant.backends.base import Backend, DescribesModel, server_silent
from mandant.config import ModelSpec
from mandant.errors import InvalidInput, ModelNotFound, Unavailable, encodable
from mandant.scheduling.base import Scheduler
from mandant.types import ModelKey, ServedModels, Tenant
from mandant.warmup import warm_up

logger = logging.getLogger(__name__)

#: How long a model version may take to load and warm up (``server.model_load_timeout_s``).
DEFAULT_LOAD_TIMEOUT_S = 300.0
#: How long a load or unload, once the old versions' calls answered (or ``grace_s``
#: passed), waits for them to be freed before it answers: closing goes on without it
#: where a call still runs on them (a model stuck in its forward pass).
FREEING_WAIT_S = 1.0
#: How long closing the registry waits for its models to be freed at shutdown.
SHUTDOWN_WAIT_S = 5.0
#: How long the closes still running after it have, once cancelled, to end.
CANCELLED_WAIT_S = 0.5
#: What RepositoryIndex tells tenants of a version that is not ready, by why; every
#: text it may give is here. Never the cause (exception text, file paths, a Triton's
#: address): that is the operator's, in the log.
FAILED_REASON = "failed to load; the operator's log has the cause"
SILENT_REASON = "its Triton backend does not answer"


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
    #: It was found ready once (by a call, a probe or a switch): a version that served
    #: comes back on its own when its backend does (a Triton restarting).
    served: bool = field(init=False, default=False)
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
        ready = self.failure is None and not self.warming and self.backend.ready
        if ready and not self.served:
            self.served = True
        return ready

    @property
    def state(self) -> str:
        """RepositoryIndex's state: ``READY`` or ``UNAVAILABLE``."""
        return "READY" if self.ready else "UNAVAILABLE"

    @property
    def reason(self) -> str:
        """RepositoryIndex's reason for tenants: that it failed, not why (``failure``
        is the operator's, logged); that its server does not answer, not where (it
        was empty: such a model was UNAVAILABLE with no word why)."""
        if self.failure is not None:
            return FAILED_REASON
        if not self.ready and server_silent(self.backend):
            return SILENT_REASON
        return ""

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
#: Awaited once model versions may no longer be served (see the module doc).
UnservedHook = Callable[[], Coroutine[object, object, None]]
#: Told of each change a reload made, as it is made (one line).
ChangeHook = Callable[[str], object]


def requested_version(version: str) -> str:
    """A version as a client asked for it, as Triton reads it: "01" is version 1 (its
    zeros dropped as text: ``int()`` refuses more than 4,300 digits, which answered
    INTERNAL); anything not a number as it is."""
    if version.isascii() and version.isdigit():
        return version.lstrip("0") or "0"
    return version


class LoadTimedOut(RuntimeError):
    """A model version was still loading (or warming up) after the load timeout."""


@dataclass(eq=False, slots=True)
class _Retirement:
    """Versions on their way out: ``drained`` once their calls answered (at most
    ``grace_s``), ``freed`` once they are closed too (and their figures dropped where
    nothing of theirs is served any more)."""

    models: Sequence[Model]
    drained: asyncio.Task[None]
    freed: asyncio.Task[None]


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
        load_timeout_s: float | None = DEFAULT_LOAD_TIMEOUT_S,
        on_unserved: UnservedHook | None = None,
    ) -> None:
        """``grace_s``: how long an unloaded or replaced model waits for its calls;
        ``names``: a set this registry adds every model name it loads to (metrics label
        these names only, so a model added later gets its own series); ``on_retired``:
        called once replaced or unloaded versions are closed (a serving process gives
        their memory back to the collector then, ``heap.py``); ``load_timeout_s``: a
        version still loading or warming up after this long failed to load (None: no
        limit); ``on_unserved``: awaited once versions may no longer be served (freed,
        or a change left their name with nothing): the caller drops the figures it
        keeps of what :meth:`served` no longer lists, ``names`` included."""
        self._backend_factory = backend_factory
        self._scheduler_factory = scheduler_factory
        self._initial = list(specs)
        self._spec_source: SpecSource = spec_source or self._initial_specs
        self._on_failure = on_failure
        self._on_retired = on_retired
        self._on_unserved = on_unserved
        self.grace_s = grace_s
        self.load_timeout_s = load_timeout_s
        #: Every model name this registry built a model for (configured names only);
        #: ``on_unserved`` takes out those no longer served.
        self.names = names if names is not None else set()
        self._models: dict[tuple[str | None, str], list[Model]] = {}
        #: Retired versions until they are freed: still served (their calls answer).
        self._leaving: set[Model] = set()
        #: Names whose retired versions were freed while a change held the name: told
        #: to ``on_unserved`` when the change ends.
        self._freed_while_busy: set[str] = set()
        #: name → (the lock its changes take in turn, how many hold or await it)
        self._changing: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        #: Freeing old versions and closing failed ones: the registry's own tasks.
        self._background: set[asyncio.Task[None]] = set()
        #: Names a reload changed whose new versions failed while the old ones stay
        #: (:attr:`unapplied`).
        self._unapplied: set[str] = set()
        self._install(self._build(spec) for spec in self._initial)

    @property
    def unapplied(self) -> frozenset[str]:
        """Names whose entries a reload changed but whose new versions failed to load,
        the old versions serving on (no version of theirs is listed as failed): a
        reload of an unchanged file tries them again, once the operator has put right
        what they lacked."""
        return frozenset(self._unapplied)

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

    def served(self) -> ServedModels:
        """The versions routed to and those retired but not freed yet; names being
        changed count as served whole."""
        keys = [model.key for model in self.all()] + [model.key for model in self._leaving]
        return ServedModels(keys, busy=self._changing.keys())

    async def start(self) -> None:
        """Load every model; one that fails is kept, not ready, with its reason."""
        await self._start_all(self.all())

    async def _start_all(
        self, models: Sequence[Model], must_be_ready: Collection[Model] = ()
    ) -> list[Model]:
        """Start ``models`` at once; the ones that failed (reason recorded, closed in
        the background). Those in ``must_be_ready`` fail too where their backend is not
        ready once started (a Triton that does not answer): they would replace
        versions that serve."""
        results = await asyncio.gather(
            *(self._start_one(model, model in must_be_ready) for model in models),
            return_exceptions=True,
        )
        failed = []
        for model, result in zip(models, results, strict=True):
            if result is None:
                continue
            if isinstance(result, LoadTimedOut):
                model.failure = f"failed to load: {result}"
            else:  # (a name or path of a loaded JSON config may hold a lone surrogate)
                cause = encodable(f"{type(result).__name__}: {result}")
                model.failure = f"failed to load: {cause}"[:1000]
            logger.error("model %s %s", model.key, model.failure)
            if self._on_failure is not None:
                self._on_failure(model.key, model.failure)
            self._close_in_background([model])
            failed.append(model)
        return failed

    async def _start_one(self, model: Model, require_ready: bool) -> None:
        model.warming = True
        limit = self.load_timeout_s
        try:
            async with asyncio.timeout(limit) as bound:
                await model.backend.start()
                if require_ready and not model.backend.ready:
                    raise Unavailable("its backend is not ready")
                await warm_up(model.backend, model.declared.warmup)
        except TimeoutError:
            if not bound.expired():
                raise
            # The backend's start was cancelled: an in-process model's loading thread
            # cannot be, and may go on until its factory returns (its result dropped).
            raise LoadTimedOut(
                f"still loading after {limit:g} s (server.model_load_timeout_s); a thread "
                "loading it may still run"
            ) from None
        await model.scheduler.start()
        model.warming = False
        logger.info("model %s loaded (%s)", model.key, model.backend.platform)

    async def load(
        self, name: str, specs: Sequence[ModelSpec] | None = None, config: str | None = None
    ) -> None:
        """(Re)load every version of ``name`` from the configuration, ``config`` (a
        JSON model entry, see ``SpecSource``) or ``specs``: started and warmed up
        beside the old ones, each owner's switched to at once when all of that owner's
        are ready (:meth:`_switch`). Answers once the old versions' calls answered (at
        most ``grace_s``) and they are freed, or freeing goes on in the background. If
        a version failed, Unavailable says which and why."""
        async with self._change(name):
            if specs is None:
                specs = self._spec_source(name, config)
            if not specs:
                raise ModelNotFound(name)
            old, failures = await self._switch(name, specs)
            retirement = self._retire(old)  # served until freed: before the turn ends
        await self._freed(retirement)
        if failures:
            raise Unavailable("; ".join(failures)[:2000])

    async def unload(self, name: str) -> None:
        """Stop routing ``name`` (new calls: NOT_FOUND), let calls already routed to
        it finish (at most ``grace_s``), then free it (in the background past that)."""
        async with self._change(name):
            old = self._remove(name)
            retirement = self._retire(old)
        if not old:
            raise ModelNotFound(name)
        logger.info("model %s unloading: %d version(s)", name, len(old))
        await self._freed(retirement)

    async def unload_owners(
        self, owners: Collection[str], on_change: ChangeHook | None = None
    ) -> list[str]:
        """Stop serving every version that one of ``owners`` (tenants a reload removed)
        owns, as :meth:`unload` does a name's: a model loaded for a tenant with a
        ``config`` is in no file, so a reload's :meth:`apply` would not see it, and a
        tenant added later under the same id was served it. One line per name. A name
        whose load is under way is dropped after it (the load installed a removed
        tenant's model once this had passed it by)."""
        names = sorted({name for owner, name in self._models if owner in owners}
                       | self._changing.keys())  # fmt: skip
        turns = {name: self._change(name) for name in names}

        async def drop(name: str) -> str | None:
            async with turns[name]:
                old = [m for owner in owners for m in self._models.pop((owner, name), [])]
                self._retire(old)
            if not old:
                return None
            change = f"model '{name}': the versions of removed tenants unloaded"
            if on_change is not None:
                on_change(change)
            return change

        changes = await asyncio.gather(*(drop(name) for name in names))
        return [change for change in changes if change is not None]

    async def apply(
        self, specs: Iterable[ModelSpec], on_change: ChangeHook | None = None
    ) -> list[str]:
        """Bring the models to ``specs`` (a reloaded configuration): names no longer
        there are unloaded; new names, changed entries and versions that had failed to
        load are loaded (each owner's apart, as :meth:`load`; an owner whose entries
        did not change keeps its versions), each decided once the changes to that name
        asked for before are done; ``on_change`` hears each change as it is made. The
        old versions are freed in the background. Returns one line per change."""
        wanted: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            wanted.setdefault(spec.name, []).append(spec)
        # Names an earlier change (a reload still loading) holds are decided here too,
        # after it: a model it is adding that this configuration lacks is unloaded.
        names = sorted(wanted.keys() | {m.key.name for m in self.all()} | self._changing.keys())
        # Every name's place in its queue is taken now, before any of them waits.
        turns = {name: self._change(name) for name in names}

        async def bring(name: str) -> str | None:
            group = wanted.get(name)
            async with turns[name]:
                if group is None:
                    old = self._remove(name)
                    change = f"model '{name}' unloaded" if old else None
                else:
                    current = {
                        owner: versions
                        for (owner, model_name), versions in self._models.items()
                        if model_name == name
                    }
                    kept = {
                        owner
                        for owner, versions in current.items()
                        if all(m.failure is None for m in versions)
                        and _same(
                            [s for s in group if s.tenant == owner], [m.declared for m in versions]
                        )
                    }
                    changed = [spec for spec in group if spec.tenant not in kept]
                    gone = current.keys() - kept - {spec.tenant for spec in changed}
                    if not changed and not gone:  # as served (a failed change undone too)
                        self._unapplied.discard(name)
                        return None
                    # What the file no longer gives (a tenant's private model or tuned
                    # variant given to another or dropped, a shared model made private)
                    # is taken away now, as a revoked key is: it served its tenants on
                    # until the new owner's versions had loaded, for minutes at worst.
                    self._retire([m for owner in gone for m in self._models.pop((owner, name))])
                    old, failures = await self._switch(name, changed, keep=kept)
                    change = _change_line(name, changed, failures, gone)
                    if failures:
                        self._unapplied.add(name)
                self._retire(old)
            if change is not None and on_change is not None:
                on_change(change)
            return change

        changes = await asyncio.gather(*(bring(name) for name in names))
        return [change for change in changes if change is not None]

    @contextlib.asynccontextmanager
    async def _hold(self, name: str, lock: asyncio.Lock, users: list[int]) -> AsyncIterator[None]:
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0] and self._changing.get(name, (None,))[0] is lock:
                del self._changing[name]
                freed_meanwhile = name in self._freed_while_busy
                self._freed_while_busy.discard(name)
                if freed_meanwhile or (name in self.names and not self.served().serves(name)):
                    # Versions of it were freed while it changed (a name being changed
                    # counts as served whole, so they were kept), or it was built and
                    # nothing of it is left (a load given up before it was routed to).
                    self._in_background(self._tell_unserved(), "model-forget")

    def _change(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """A place in ``name``'s queue of changes, taken now (module doc); entering
        waits for its turn. The lock lives only while someone holds or awaits it."""
        entry = self._changing.get(name)
        if entry is None:
            entry = self._changing[name] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        return self._hold(name, lock, users)

    def _served(self, owner: str | None, name: str, shared_stays: bool = True) -> bool:
        """Whether ``owner``'s tenant (every tenant, for the shared versions) is served
        ``name``: by a version of the owner's that is ready or once was, or (a tenant
        without versions of its own) by such a shared one, where the shared versions
        stay (``shared_stays``). One that served and is not ready now (a Triton
        restarting) comes back on its own: a failed load must not replace it by a
        version that never will; one never ready has nothing to keep."""
        own = self._models.get((owner, name))
        if own:
            return any(model.ready or model.served for model in own)
        if owner is None or not shared_stays:
            return False
        return any(model.ready or model.served for model in self._models.get((None, name), ()))

    async def _switch(
        self, name: str, specs: Sequence[ModelSpec], keep: Collection[str | None] | None = None
    ) -> tuple[list[Model], list[str]]:
        """Start ``specs`` (versions of ``name``) and route to them, owner by owner (in
        its turn): an owner whose new versions all loaded is replaced; one whose load
        failed keeps what serves its tenants now (versions serving are replaced only by
        ready ones: a new Triton URL that does not answer keeps the old; shared ones
        count only where they stay), and where nothing does (a name or owner not
        served yet) its new versions are routed at once, failed ones listed with their
        reason, as at start-up. Owners neither in ``specs`` nor in ``keep`` are
        removed: by a reload (``keep`` given: the file says what stays) whatever
        failed, by a load (``keep`` None) only if nothing failed, so that a failed load
        leaves every owner's versions as they were (it took another tenant's tuned
        variant away while answering that the versions serving stay). Returns the
        versions to retire and what failed, one line per owner."""
        fresh: dict[str | None, list[Model]] = {}
        for spec in specs:
            model = self._build(spec)
            fresh.setdefault(model.key.owner, []).append(model)
        # A tenant served by the shared versions keeps being served by them on a failed
        # load only where they stay (a shared model made private and failing to load
        # left its tenant with nothing, the log saying its versions stayed).
        shared_stays = None in fresh or keep is None or None in keep
        served = {owner: self._served(owner, name, shared_stays) for owner in fresh}
        must_be_ready = [m for owner, models in fresh.items() if served[owner] for m in models]
        starting = [model for models in fresh.values() for model in models]
        try:
            failed = await self._start_all(starting, must_be_ready)
        except asyncio.CancelledError:  # the caller gave up (or the server stops)
            self._close_in_background(starting)
            raise
        # No await from here on: no call sees a version missing or half switched.
        old: list[Model] = []
        failures = []
        for owner, models in fresh.items():
            broken = [model for model in models if model in failed]
            if broken:
                keeps = " (the versions serving stay)" if served[owner] else ""
                failures.append(f"{_described(broken[0].key)} {broken[0].failure}{keeps}")
                if served[owner]:
                    self._close_in_background([m for m in models if m not in broken])
                    continue
            old += self._models.pop((owner, name), [])
            self._install(models)
        if keep is not None or not failures:
            for key in [key for key in self._models if key[1] == name]:
                if key[0] not in fresh and key[0] not in (keep or ()):
                    old += self._models.pop(key)
        if len(failures) < len(fresh):
            logger.info("model %s loaded: %d version(s)", name, len(specs))
        if not failures:
            self._unapplied.discard(name)
        return old, failures

    def _remove(self, name: str) -> list[Model]:
        self._unapplied.discard(name)
        keys = [key for key in self._models if key[1] == name]
        return [model for key in keys for model in self._models.pop(key)]

    # -- freeing -----------------------------------------------------------------------

    def _in_background(
        self, work: Coroutine[object, object, None], name: str
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _close_in_background(self, models: Sequence[Model]) -> None:
        """Close versions no call ever reached (failed or not switched to)."""
        if models:
            self._in_background(_close(models), "model-close")

    def _retire(self, models: Sequence[Model]) -> _Retirement | None:
        """Free ``models`` in the background once their calls answered (at most
        ``grace_s``; the ones still queued then answer Unavailable)."""
        if not models:
            return None
        self._leaving.update(models)
        drained = asyncio.create_task(_drain(models, self.grace_s), name="model-drain")
        freed = self._in_background(self._free(models, drained), "model-free")
        return _Retirement(models, drained, freed)

    async def _free(self, models: Sequence[Model], drained: asyncio.Task[None]) -> None:
        try:
            await drained
            await _close([model for model in models if model.failure is None])
        finally:
            self._leaving.difference_update(models)
            self._freed_while_busy.update(
                m.key.name for m in models if m.key.name in self._changing
            )
        if self._on_retired is not None:
            try:
                self._on_retired()
            except Exception:
                logger.exception("the hook after freeing retired model versions failed")
        await self._tell_unserved()

    async def _tell_unserved(self) -> None:
        """Run ``on_unserved``; a failure is logged, and freeing and the next changes
        go on (its next run drops what this one did not)."""
        if self._on_unserved is None:
            return
        try:
            await self._on_unserved()
        except Exception:
            logger.exception("dropping the figures of models no longer served failed")

    async def _freed(self, retirement: _Retirement | None) -> None:
        """A load's or unload's wait: until the old versions' calls answered (at most
        ``grace_s``), then their freeing (``on_unserved`` included: once answered, an
        unloaded model's figures are gone in one process), at most ``FREEING_WAIT_S``
        more. A caller that gives up stops neither (``asyncio.wait`` cancels nothing it
        waits for)."""
        if retirement is None:
            return
        await asyncio.wait({retirement.drained})
        await asyncio.wait({retirement.freed}, timeout=FREEING_WAIT_S)
        if not retirement.freed.done() and any(model.calls for model in retirement.models):
            logger.warning(
                "model %s: a call still runs on the old version(s) after grace_s; they are "
                "closed when it ends",
                ", ".join(sorted({str(model.key) for model in retirement.models})),
            )

    async def aclose(self) -> None:
        """Close every version and finish freeing the old ones, waiting at most
        ``SHUTDOWN_WAIT_S`` (a call stuck in a model, a load that hangs): what is left
        then is cancelled, its threads left to end with the process."""
        serving = [model for model in self.all() if model.failure is None]
        if serving:
            self._in_background(_close(serving), "model-close")
        if not self._background:
            return
        _, pending = await asyncio.wait(set(self._background), timeout=SHUTDOWN_WAIT_S)
        if pending:
            logger.warning(
                "%d model(s) not freed in %g s: left behind", len(pending), SHUTDOWN_WAIT_S
            )
            for task in pending:
                task.cancel()
            # One waiting on a forward pass (which cannot be stopped) outlives this
            # cancellation (``backends/torch.py``): not waited for.
            await asyncio.wait(pending, timeout=CANCELLED_WAIT_S)

    # -- resolution ----------------------------------------------------------------------

    def versions(self, tenant: Tenant, name: str) -> Sequence[Model]:
        """The versions of ``name`` that ``tenant`` sees, newest first (may be empty)."""
        return self._models.get((tenant.id, name)) or self._models.get((None, name)) or ()

    def resolve(self, tenant: Tenant, name: str, version: str | None = None) -> Model:
        versions = self.versions(tenant, name)
        if not versions:
            raise ModelNotFound(name)
        if version:
            version = requested_version(version)
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


async def _drain(models: Sequence[Model], grace_s: float) -> None:
    await asyncio.gather(*(model.drain(grace_s) for model in models))


async def _close(models: Sequence[Model]) -> None:
    """Close ``models`` at once (one stuck does not hold the others); errors logged."""
    results = await asyncio.gather(*(model.aclose() for model in models), return_exceptions=True)
    for model, result in zip(models, results, strict=True):
        if isinstance(result, Exception):
            logger.error("model %s did not close cleanly", model.key, exc_info=result)


def _described(key: ModelKey) -> str:
    """A version as a load's answer and the log name it: its owner where it has one."""
    owner = f" of tenant '{key.owner}'" if key.owner else ""
    return f"model '{key.name}' version {key.version}{owner}"


def _change_line(
    name: str, specs: Sequence[ModelSpec], failures: Sequence[str], gone: Collection[str | None]
) -> str:
    """A reload's line for one name: loaded, or which versions failed; whose versions
    it no longer has."""
    owners = {spec.tenant for spec in specs}
    if not failures:
        line = f"model '{name}' loaded" if specs else f"model '{name}' changed"
    else:
        done = "partly loaded" if len(failures) < len(owners) else "not loaded"
        line = f"model '{name}' {done}: {'; '.join(failures)}"
    if gone:
        whose = sorted(
            "the shared versions" if owner is None else f"the versions of tenant '{owner}'"
            for owner in gone
        )
        line += f"; {', '.join(whose)} unloaded"
    return line


def _same(specs: Sequence[ModelSpec], others: Sequence[ModelSpec]) -> bool:
    def order(spec: ModelSpec) -> tuple[str, int]:
        return (spec.tenant or "", int(spec.version))

    return sorted(specs, key=order) == sorted(others, key=order)
