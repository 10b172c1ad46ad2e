"""The reporting seam: the stages of the data plane say what happened through this
protocol and know nothing of Prometheus. ``observability/metrics.py`` implements it
with Prometheus series; :class:`NullObserver` ignores everything.

Label values are only ever tenant ids and model names from the configuration
(``""`` where none is known, e.g. an unauthenticated call), never client input.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

#: Waits until the events of the calls already answered are all recorded: what a
#: report of them (usage, ModelStatistics) awaits first. One process records each
#: event as it happens (:func:`recorded`); with ``workers: N`` the front ends' events
#: travel to the engine, a little later (``EngineServer.settle``).
Settle = Callable[[], Awaitable[None]]


async def recorded() -> None:
    """Nothing to wait for: this process's events are recorded as they happen."""


class Observer(Protocol):
    def request_finished(
        self,
        tenant: str,
        model: str,
        code: str,
        duration_s: float,
        version: str = "",
        inference: bool = False,
        owner: str = "",
        busy: bool = False,
    ) -> None:
        """A call was answered; ``code`` is the gRPC status name (OK, NOT_FOUND, …);
        ``version``: the version of ``model`` it resolved ("" where none);
        ``inference``: an inference call (a ModelInfer, a stream message, a REST
        infer), also one that ended before its model was known (its deadline passed
        at the front door): it counts against its tenant's SLO; not so a call whose
        message or body its client never finished sending (False: the client stalled,
        not the server); ``owner``: the tenant
        owning ``model`` (a private model or tuned variant), "" for a shared one;
        ``busy``: refused for the server-wide cap on calls, or its place at the door
        taken by another tenant's call (RESOURCE_EXHAUSTED on the server's account, not
        the tenant's limits: it counts against the SLO, as bad)."""
        ...

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        """Time one request spent queued, and the compute time of the batch it ran in."""
        ...

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        """One backend execution of ``size`` rows, with each tenant's share of them;
        ``owner``: the tenant owning ``model`` (a private model or tuned variant), ""
        for a shared one (a private model and a shared one may have one name)."""
        ...

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        """One backend execution of ``size`` rows raised (its requests are then
        retried apart to find the one(s) at fault); ``owner`` as for
        :meth:`batch_executed`."""
        ...

    def admitted(self, tenant: str, model: str, rows: int) -> None: ...

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        """Admitted rows given back: the model did not run for the call;
        ``admitted_at``: when they were admitted (wall clock, epoch s; 0: now), so that
        they leave the day and month they were counted in."""
        ...

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        """A request refused by admission or a queue cap; ``reason`` is a fixed word
        such as ``requests_per_s``, ``rows_per_s``, ``concurrency``, ``quota``,
        ``queue_full``; ``model``: the configured model whose own limit refused it
        (a per-model rate limit or quota, its queue cap), ``""`` for a tenant-wide one."""
        ...

    def store_error(self, store: str) -> None:
        """The shared limits store failed one operation (Redis unreachable, …)."""
        ...

    def calls_gathered(self, calls: int) -> None:
        """The gRPC front end let go a group of ``calls`` unary calls it had held
        together (``scheduling/gather.py``)."""
        ...


class NullObserver:
    def request_finished(
        self,
        tenant: str,
        model: str,
        code: str,
        duration_s: float,
        version: str = "",
        inference: bool = False,
        owner: str = "",
        busy: bool = False,
    ) -> None:
        return None

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        return None

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        return None

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        return None

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        return None

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        return None

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        return None

    def store_error(self, store: str) -> None:
        return None

    def calls_gathered(self, calls: int) -> None:
        return None
