"""Models by (owner, name, version), and the three tenancy patterns:

* shared (``owner is None``): every tenant may call it;
* private (``owner == tenant``, no base): exists for its tenant only;
* tuned (``owner == tenant`` with a base): its tenant reaches it under the base's
  name, everyone else gets the base.

Resolution looks at the caller's own models under a name first, then the shared
ones. A model another tenant owns is indistinguishable from one that does not
exist: same error, same message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mandant.backends.base import Backend, DescribesModel
from mandant.config import ModelSpec
from mandant.errors import ModelNotFound
from mandant.scheduling.base import Scheduler
from mandant.types import ModelKey, Tenant

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Model:
    key: ModelKey
    declared: ModelSpec
    backend: Backend
    scheduler: Scheduler
    describer: DescribesModel | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.backend, DescribesModel):
            self.describer = self.backend

    @property
    def spec(self) -> ModelSpec:
        """The configured spec, or the backend's where it discovers its tensors (Triton)."""
        return self.describer.spec if self.describer is not None else self.declared

    @property
    def ready(self) -> bool:
        return self.backend.ready


BackendFactory = Callable[[ModelSpec], Backend]
SchedulerFactory = Callable[[ModelSpec, Backend], Scheduler]


class ModelRegistry:
    def __init__(
        self,
        specs: Iterable[ModelSpec],
        backend_factory: BackendFactory,
        scheduler_factory: SchedulerFactory,
    ) -> None:
        self._models: dict[tuple[str | None, str], list[Model]] = {}
        for spec in specs:
            backend = backend_factory(spec)
            model = Model(
                ModelKey(spec.name, spec.version, spec.tenant),
                spec,
                backend,
                scheduler_factory(spec, backend),
            )
            self._models.setdefault((spec.tenant, spec.name), []).append(model)
        for versions in self._models.values():
            versions.sort(key=lambda m: int(m.key.version), reverse=True)

    def all(self) -> list[Model]:
        return [model for versions in self._models.values() for model in versions]

    async def start(self) -> None:
        models = self.all()
        results = await asyncio.gather(
            *(self._start_one(model) for model in models), return_exceptions=True
        )
        failures = [(m, r) for m, r in zip(models, results, strict=True) if r is not None]
        if failures:
            await self.aclose()
            detail = "; ".join(f"{m.key}: {r}" for m, r in failures)
            raise RuntimeError(f"{len(failures)} model(s) failed to load: {detail}")

    @staticmethod
    async def _start_one(model: Model) -> None:
        await model.backend.start()
        await model.scheduler.start()
        logger.info("model %s loaded (%s)", model.key, model.backend.platform)

    async def aclose(self) -> None:
        for model in self.all():
            await model.scheduler.aclose()
            await model.backend.aclose()

    def versions(self, tenant: Tenant, name: str) -> Sequence[Model]:
        """The versions of ``name`` that ``tenant`` sees, newest first (may be empty)."""
        return self._models.get((tenant.id, name)) or self._models.get((None, name)) or ()

    def resolve(self, tenant: Tenant, name: str, version: str | None = None) -> Model:
        versions = self.versions(tenant, name)
        if not versions:
            raise ModelNotFound(name)
        if version:
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
