"""Triton-style inference statistics (the ModelStatistics RPC), kept in this process per
(tenant, model owner, model name, version): a tenant's numbers hold its own calls
only, and a model's its own (a tenant's tuned variant added by a reload starts from
nothing, and the shared model's figures keep the tenant's earlier calls).

Fed by the :class:`~mandant.events.Observer` events through :class:`StatsObserver`,
which records them and hands every event on to the next observer (Prometheus):

* ``request_finished`` of an inference call (one that resolved a model): ``success``
  or ``fail`` with the call's time in the server; ``last_inference``;
* ``request_timing``: ``queue`` and ``compute_infer`` (the compute time of the batch
  the request ran in, as Triton counts it);
* ``batch_executed``: per tenant in the batch, one execution of that batch size
  (``batch_stats``, ``execution_count``), its rows (``inference_count``) and its rows'
  share of the batch's compute time (``compute_share_ns``: what a tenant's own view
  gives as ``compute_infer``'s time; the batch's whole time beside ``/usage``'s share
  told it how many rows others sent in its batches); and, per
  model version (its owner's), the execution itself: an admin's totals count a batch
  that mixed tenants once, not once per tenant in it.

Keys are configured tenant ids, model names and versions (never client text), so the
store is bounded by the configuration; a model version no longer served is dropped
(:meth:`InferenceStats.forget`), and one that comes back starts from zero, as Triton's
do when a model loads. A tenant a reload removed is dropped
(:meth:`InferenceStats.forget_tenants`), and the events of its calls that end later are
not recorded (``configured``): a tenant added back under its id read them as its own.
Single-threaded: the event loop's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

from mandant.events import Observer, Settle, recorded
from mandant.types import ServedModels

#: (tenant id, owner: a tenant id or "" for a shared model, model name, version).
StatsKey = tuple[str, str, str, str]

_NS_PER_S = 1_000_000_000

#: Batch sizes kept exactly; larger ones are kept under the next power of two. A model
#: without batching runs each call alone, so its "batch" is the call's rows, which a
#: client chooses: one entry per distinct count grew without bound (320,000 of them).
EXACT_BATCH_SIZES = 1024


def size_key(size: int) -> int:
    """Where a batch of ``size`` rows is counted (:data:`EXACT_BATCH_SIZES`)."""
    return size if size <= EXACT_BATCH_SIZES else 1 << (size - 1).bit_length()


@dataclass(slots=True)
class Duration:
    """Triton's ``StatisticDuration``: how many, and their summed time."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += round(seconds * _NS_PER_S)

    def merge(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns


@dataclass(slots=True)
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    #: batch size → the executions of that size (count) and their compute time.
    batches: dict[int, Duration] = field(default_factory=dict)
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # backend executions that held some of these rows
    #: These rows' share of the compute time of the batches they ran in (by rows).
    compute_share_ns: int = 0
    last_inference_ms: int = 0  # wall clock, ms since the epoch; 0: never

    def merge(self, other: ModelStats) -> None:
        self.success.merge(other.success)
        self.fail.merge(other.fail)
        self.queue.merge(other.queue)
        self.compute_infer.merge(other.compute_infer)
        for size, duration in other.batches.items():
            self.batches.setdefault(size, Duration()).merge(duration)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.compute_share_ns += other.compute_share_ns
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)


class InferenceStats:
    """``wall_clock_s``: seconds since the epoch (for ``last_inference`` only).
    ``settle``: until the events of calls already answered are recorded (what a
    ModelStatistics call awaits first, as ``settled``). ``models``: the model names
    recorded (the App's: those served), read at each event: a call still answering
    after its model was forgotten (one that outlived ``grace_s``) brings back nothing;
    None: every name."""

    def __init__(
        self,
        wall_clock_s: Callable[[], float] = time.time,
        settle: Settle = recorded,
        models: Container[str] | None = None,
        configured: Callable[[str], bool] | None = None,
    ) -> None:
        self._wall_clock_s = wall_clock_s
        self.settled = settle
        self._models = models
        #: Whether a tenant id is configured now (None: every id is).
        self._configured = configured
        self._stats: dict[StatsKey, ModelStats] = {}
        #: (owner, name, version) -> its executions: ``batches`` and
        #: ``execution_count`` only.
        self._executions: dict[tuple[str, str, str], ModelStats] = {}

    def get(self, tenant: str, owner: str, model: str, version: str) -> ModelStats:
        """A copy of one tenant's statistics of one model version (zeros if none)."""
        total = ModelStats()
        recorded = self._stats.get((tenant, owner, model, version))
        if recorded is not None:
            total.merge(recorded)
        return total

    def keys(self) -> list[StatsKey]:
        return list(self._stats)

    def totals(
        self, scopes: Container[tuple[str, str, str]] | None = None
    ) -> dict[tuple[str, str, str], ModelStats]:
        """Each model version's statistics summed over its tenants, by (owner, model,
        version) (only those in ``scopes``, if given), in one pass over the entries.
        (An admin's statistics summed each model's by scanning every entry: models x
        entries, 3.9 s of the event loop at 1,000 tenants x 150 models, and with
        ``workers: N`` the front ends took the silent engine for gone.)"""
        totals: dict[tuple[str, str, str], ModelStats] = {}
        for (_, owner, model, version), entry in self._stats.items():
            scope = (owner, model, version)
            total = totals.get(scope)
            if total is None:
                if scopes is not None and scope not in scopes:
                    continue
                total = totals[scope] = ModelStats()
            total.merge(entry)
        return totals

    def executions(self, owner: str, model: str, version: str) -> ModelStats:
        """A copy of one model version's executions (``batches``, ``execution_count``),
        whoever's rows they held; ``owner``: the tenant owning it, "" if shared."""
        total = ModelStats()
        recorded = self._executions.get((owner, model, version))
        if recorded is not None:
            total.merge(recorded)
        return total

    def observe(
        self, forward: Observer, version: str | None = None, owner: str = ""
    ) -> StatsObserver:
        """An observer that records into this store and forwards to ``forward``.
        ``version``: the model version a scheduler runs (its timing and batch events
        say no version), and ``owner`` that model's (a tenant id, "" if shared); None
        for the front end (its events say the version)."""
        return StatsObserver(self, forward, version, owner)

    def forget(self, served: ServedModels) -> None:
        """Drop the statistics of the model versions ``served`` does not list."""
        for key in [key for key in self._stats if not served.serves(key[2], key[1], key[3])]:
            del self._stats[key]
        for run in [run for run in self._executions if not served.serves(run[1], run[0], run[2])]:
            del self._executions[run]

    def forget_tenants(self, tenants: Container[str]) -> None:
        """Drop the statistics of the tenants not in ``tenants`` (removed by a reload):
        a tenant added later under the same id must not read them as its own."""
        for key in [key for key in self._stats if key[0] and key[0] not in tenants]:
            del self._stats[key]

    def _recorded(self, model: str) -> bool:
        return self._models is None or model in self._models

    def _entry(self, key: StatsKey) -> ModelStats | None:
        """``key``'s statistics, made if none: None for a tenant no longer configured
        (its entries went with the reload that removed it; its late calls' events bring
        none back)."""
        entry = self._stats.get(key)
        if entry is None:
            configured = self._configured
            if key[0] and configured is not None and not configured(key[0]):
                return None
            entry = self._stats[key] = ModelStats()
        return entry

    def record_finished(
        self, tenant: str, owner: str, model: str, version: str, ok: bool, duration_s: float
    ) -> None:
        if not self._recorded(model):
            return
        entry = self._entry((tenant, owner, model, version))
        if entry is None:
            return
        (entry.success if ok else entry.fail).add(duration_s)
        entry.last_inference_ms = int(self._wall_clock_s() * 1000)

    def record_timing(
        self,
        tenant: str,
        owner: str,
        model: str,
        version: str,
        queue_s: float,
        compute_s: float,
    ) -> None:
        if not self._recorded(model):
            return
        entry = self._entry((tenant, owner, model, version))
        if entry is None:
            return
        entry.queue.add(queue_s)
        entry.compute_infer.add(compute_s)

    def record_batch(
        self,
        model: str,
        version: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        if not self._recorded(model):
            return
        ns_per_row = compute_s * _NS_PER_S / max(1, size)
        size = size_key(size)
        model_key = (owner, model, version)
        run = self._executions.get(model_key)
        if run is None:
            run = self._executions[model_key] = ModelStats()
        executions = run.batches.get(size)
        if executions is None:  # not setdefault: a Duration made on every call
            executions = run.batches[size] = Duration()
        executions.add(compute_s)
        run.execution_count += 1
        for tenant, rows in rows_by_tenant.items():
            entry = self._entry((tenant, owner, model, version))
            if entry is None:
                continue
            executions = entry.batches.get(size)
            if executions is None:
                executions = entry.batches[size] = Duration()
            executions.add(compute_s)
            entry.execution_count += 1
            entry.inference_count += rows
            entry.compute_share_ns += round(ns_per_row * rows)


class StatsObserver:
    """Records the events :class:`InferenceStats` keeps, then forwards every event."""

    def __init__(
        self, stats: InferenceStats, forward: Observer, version: str | None, owner: str = ""
    ) -> None:
        self._stats = stats
        self._forward = forward
        self._version = version
        self._owner = owner

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
        self._forward.request_finished(
            tenant, model, code, duration_s, version, inference, owner, busy
        )
        if model and tenant:  # an inference call that reached a model
            self._stats.record_finished(tenant, owner, model, version, code == "OK", duration_s)

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        self._forward.request_timing(tenant, model, queue_s, compute_s)
        if self._version is not None:
            self._stats.record_timing(tenant, self._owner, model, self._version, queue_s, compute_s)

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        self._forward.batch_executed(model, size, compute_s, rows_by_tenant, owner)
        if self._version is not None:
            self._stats.record_batch(
                model, self._version, size, compute_s, rows_by_tenant, self._owner
            )

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        self._forward.batch_failed(model, size, owner)

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        self._forward.admitted(tenant, model, rows)

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        self._forward.refunded(tenant, model, rows, admitted_at)

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        self._forward.rejected(tenant, reason, model)

    def store_error(self, store: str) -> None:
        self._forward.store_error(store)

    def calls_gathered(self, calls: int) -> None:
        self._forward.calls_gathered(calls)
