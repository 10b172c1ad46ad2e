"""The :class:`~mandant.events.Observer` implemented with Prometheus series on an
injected ``CollectorRegistry`` (never the global one), plus the in-process SLO
windows and dashboard stats.

Labels are bounded by the configuration: a tenant id or model name that is not
configured is recorded as ``""``, so no client text ever becomes a series.

Which calls feed what:

* ``mandant_requests_total{tenant,model,code}``: every RPC. ``model`` is the
  configured name of the model that served an inference call, ``""`` otherwise
  (metadata RPCs, unknown model, unauthenticated).
* ``mandant_request_duration_seconds`` and the SLO counters: inference calls that
  reached a model and were answered on the server's account (:data:`SLO_CODES`);
  the histogram holds successful ones only (like Triton's), the SLO counters also
  count server-side failures as bad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from mandant.config import SloConfig, TenantConfig
from mandant.observability.live import LiveStats
from mandant.observability.slo import SLO_CODES, SloTracker, is_good
from mandant.tenancy.directory import TenantDirectory

#: Seconds; fine enough around millisecond SLOs. Each tenant's SLO threshold is added.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


_M = TypeVar("_M", bound=MetricWrapperBase)


def _buckets(extra_s: Iterable[float]) -> list[float]:
    return sorted(set(DURATION_BUCKETS_S) | set(extra_s))


class PrometheusObserver:
    """Records every event of the data plane. ``slo`` and ``live`` are optional
    in-process views fed from the same calls (the dashboard reads them)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        tenants: Sequence[TenantConfig] | TenantDirectory,
        models: Iterable[str],
        slo: SloTracker | None = None,
        live: LiveStats | None = None,
    ) -> None:
        """``tenants``: the tenant directory, read on every call (a tenant added by a
        reload gets its own label, a changed SLO applies at once); or fixed configs."""
        self._directory = (
            tenants if isinstance(tenants, TenantDirectory) else TenantDirectory(tenants)
        )
        self._models = frozenset(models)
        self._slo = slo
        self._live = live
        # Histogram buckets are fixed for the process: the SLO thresholds at start.
        buckets = _buckets(self._directory.current.slo_thresholds_s.values())

        self.requests = Counter(
            "mandant_requests", "Calls answered, by gRPC status name.",
            ["tenant", "model", "code"], registry=registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "mandant_request_duration_seconds",
            "Time from receiving a successful inference call to answering it.",
            ["tenant", "model"], buckets=buckets, registry=registry,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "mandant_queue_duration_seconds", "Time a request waited for its batch to run.",
            ["tenant", "model"], buckets=buckets, registry=registry,
        )  # fmt: skip
        self.compute_duration = Histogram(
            "mandant_compute_duration_seconds", "Compute time of the batch a request ran in.",
            ["tenant", "model"], buckets=buckets, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mandant_batch_size", "Rows per backend execution.",
            ["model"], buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.failed_batches = Counter(
            "mandant_failed_batches", "Backend executions that raised (their requests "
            "are then retried apart, so only the ones at fault fail).",
            ["model"], registry=registry,
        )  # fmt: skip
        self.inflight = Gauge(
            "mandant_inflight_requests", "Calls being served now.", ["tenant"],
            registry=registry,
        )  # fmt: skip
        self.rejections = Counter(
            "mandant_rejections", "Requests refused by admission or a queue cap, by reason.",
            ["tenant", "reason"], registry=registry,
        )  # fmt: skip
        self.rows = Counter(
            "mandant_rows", "Rows executed, for cost allocation.", ["tenant", "model"],
            registry=registry,
        )  # fmt: skip
        self.compute_seconds = Counter(
            "mandant_compute_seconds",
            "Backend compute time, each batch split among its tenants by rows.",
            ["tenant", "model"], registry=registry,
        )  # fmt: skip
        self.admitted_rows = Counter(
            "mandant_admitted_rows", "Rows admitted (counted against quotas).",
            ["tenant", "model"], registry=registry,
        )  # fmt: skip
        self.store_errors = Counter(
            "mandant_store_errors", "Failed operations on the shared limits store.", ["store"],
            registry=registry,
        )  # fmt: skip
        registry.register(SloTargets(self._directory))
        self.slo_requests = Counter(
            "mandant_slo_requests", "Inference calls judged against the tenant's SLO.",
            ["tenant"], registry=registry,
        )  # fmt: skip
        self.slo_good = Counter(
            "mandant_slo_good_requests", "Inference calls answered OK within the SLO latency.",
            ["tenant"], registry=registry,
        )  # fmt: skip
        snapshot = self._directory.current
        for tenant in snapshot.slos:
            self.slo_requests.labels(tenant)
            self.slo_good.labels(tenant)
        for tenant in snapshot.ids:
            self.inflight.labels(tenant)
        # Labelled children cached by label tuple: ``labels()`` costs a lock and
        # validation on every call; the hot path takes a dict lookup instead.
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: _M, *labels: str) -> _M:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(_M, child)

    def _tenant(self, tenant: str) -> str:
        return tenant if tenant in self._directory.current.ids else ""

    def _model(self, model: str) -> str:
        return model if model in self._models else ""

    # -- Observer --------------------------------------------------------------------

    def request_finished(self, tenant: str, model: str, code: str, duration_s: float) -> None:
        tenant, model = self._tenant(tenant), self._model(model)
        self._child(self.requests, tenant, model, code).inc()
        if not model or code not in SLO_CODES:
            return
        if code == "OK":
            self._child(self.request_duration, tenant, model).observe(duration_s)
        if self._live is not None:
            self._live.record_request(tenant, code, duration_s)
        threshold = self._directory.current.slo_thresholds_s.get(tenant)
        if threshold is None:
            return
        good = is_good(code, duration_s, threshold)
        self._child(self.slo_requests, tenant).inc()
        if good:
            self._child(self.slo_good, tenant).inc()
        if self._slo is not None:
            self._slo.record(tenant, good)

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        tenant, model = self._tenant(tenant), self._model(model)
        self._child(self.queue_duration, tenant, model).observe(queue_s)
        self._child(self.compute_duration, tenant, model).observe(compute_s)

    def batch_executed(
        self, model: str, size: int, compute_s: float, rows_by_tenant: Mapping[str, int]
    ) -> None:
        model = self._model(model)
        self._child(self.batch_size, model).observe(size)
        if self._live is not None:
            self._live.record_batch(model, size)
        total_rows = sum(rows_by_tenant.values()) or 1
        for tenant, rows in rows_by_tenant.items():
            label = self._tenant(tenant)
            self._child(self.rows, label, model).inc(rows)
            share = compute_s * rows / total_rows
            self._child(self.compute_seconds, label, model).inc(share)

    def batch_failed(self, model: str, size: int) -> None:
        self._child(self.failed_batches, self._model(model)).inc()

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        tenant = self._tenant(tenant)
        self._child(self.admitted_rows, tenant, self._model(model)).inc(rows)
        if self._live is not None:
            self._live.record_admitted(tenant, rows)

    def rejected(self, tenant: str, reason: str) -> None:
        tenant = self._tenant(tenant)
        self._child(self.rejections, tenant, reason).inc()
        if self._live is not None:
            self._live.record_rejection(tenant, reason)

    def inflight_changed(self, tenant: str, delta: int) -> None:
        tenant = self._tenant(tenant)
        self._child(self.inflight, tenant).inc(delta)
        if self._live is not None:
            self._live.inflight_changed(tenant, delta)

    def store_error(self, store: str) -> None:
        self._child(self.store_errors, store).inc()


class SloTargets:
    """``mandant_slo_objective`` and ``mandant_slo_latency_seconds`` per tenant with an
    SLO, read from the tenant directory at scrape time (a reload shows at once)."""

    def __init__(self, directory: TenantDirectory) -> None:
        self._directory = directory

    def describe(self) -> list[Metric]:
        return self._families({})

    def collect(self) -> list[Metric]:
        return self._families(self._directory.current.slos)

    @staticmethod
    def _families(slos: Mapping[str, SloConfig]) -> list[Metric]:
        objective = GaugeMetricFamily(
            "mandant_slo_objective", "Target fraction of good requests.", labels=["tenant"]
        )
        latency = GaugeMetricFamily(
            "mandant_slo_latency_seconds",
            "A good request is answered OK within this time.",
            labels=["tenant"],
        )
        for tenant, slo in slos.items():
            objective.add_metric([tenant], slo.objective)
            latency.add_metric([tenant], slo.latency_ms / 1000.0)
        return [objective, latency]


class ModelReadiness:
    """``mandant_model_ready{model,version,tenant}``: 1 while a model version can serve,
    read at scrape time. ``tenant`` is the owner of a private or tuned model, ``""``
    for shared ones; every label comes from the configuration."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, str, str, bool]]]) -> None:
        self._models = models

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for name, version, owner, ready in self._models():
            family.add_metric([name, version, owner], 1.0 if ready else 0.0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mandant_model_ready",
            "1 while the model version is ready to serve, else 0.",
            labels=["model", "version", "tenant"],
        )
