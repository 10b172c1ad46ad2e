"""The :class:`~mandant.events.Observer` implemented with Prometheus series on an
injected ``CollectorRegistry`` (never the global one), plus the in-process SLO
windows and dashboard stats.

Labels are bounded by the configuration: a tenant id or model name that is not
configured is recorded as ``""``, so no client text ever becomes a series.

Which calls feed what:

* ``mandant_rejections_total{tenant,reason,model}``: ``model`` is set where the
  model's own limit refused the call (a per-model rate limit or quota, its queue
  cap), ``""`` for the tenant's limits.
* ``mandant_batch_size{model,tenant}``, ``mandant_failed_batches_total{model,tenant}``:
  ``tenant`` is the model's owner (a private model or tuned variant), ``""`` for a
  shared one, as in ``mandant_model_ready``: a tenant's model named like a shared one
  has its own series (its figures are as confidential as the model).
* ``mandant_requests_total{tenant,model,code}``: every RPC. ``model`` is the
  configured name of the model that served an inference call, ``""`` otherwise
  (metadata RPCs, unknown model, unauthenticated).
* ``mandant_request_duration_seconds`` and the SLO counters: inference calls that
  reached a model and were answered on the server's account (:data:`SLO_CODES`);
  the histogram holds successful ones only (like Triton's), the SLO counters also
  count server-side failures as bad.

A model no longer served (unloaded, or removed by a reload) loses its series
(:meth:`PrometheusObserver.forget`), as Prometheus expects of an object that is gone:
a counter that vanishes ends (``rate`` and ``increase`` see no reset), and one that
comes back with the model starts from zero with a new ``_created``. Only ``/metrics``
forgets: a usage report still counts the calls, rows and compute seconds that the
dropped counters held (billing figures). So does a tenant a reload removed
(:meth:`PrometheusObserver.retire_tenants`): the calls of it that end later feed only
the usage counts kept aside, no series of its id (a tenant added back under that id
would read them as its own).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from mandant.config import SloConfig, TenantConfig
from mandant.observability.live import LiveStats
from mandant.observability.series import (
    CounterSeries,
    Dropped,
    HistogramSeries,
    Labels,
    SeriesCollector,
)
from mandant.observability.slo import SLO_CODES, SloTracker, is_good
from mandant.tenancy.directory import TenantDirectory
from mandant.types import ServedModels

#: Seconds; fine enough around millisecond SLOs. Each tenant's SLO threshold is added.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _buckets(extra_s: Iterable[float]) -> list[float]:
    return sorted(set(DURATION_BUCKETS_S) | set(extra_s))


class PrometheusObserver:
    """Records every event of the data plane. ``slo`` and ``live`` are optional
    in-process views fed from the same calls (the dashboard reads them). Series are
    plain numbers read at scrape time (:mod:`.series`): call it from the event loop
    thread, like the rest of the data plane."""

    def __init__(
        self,
        registry: CollectorRegistry,
        tenants: Sequence[TenantConfig] | TenantDirectory,
        models: Iterable[str],
        slo: SloTracker | None = None,
        live: LiveStats | None = None,
    ) -> None:
        """``tenants``: the tenant directory, read on every call (a tenant added by a
        reload gets its own label, a changed SLO applies at once); or fixed configs.
        ``models``: the model names to label; a ``set`` is kept and read on every call
        (the registry adds the models a reload or load brings), anything else copied."""
        self._directory = (
            tenants if isinstance(tenants, TenantDirectory) else TenantDirectory(tenants)
        )
        self._models = models if isinstance(models, set) else frozenset(models)
        self._slo = slo
        self._live = live
        # Histogram buckets are fixed for the process: the SLO thresholds at start.
        buckets = _buckets(self._directory.current.slo_thresholds_s.values())

        self.requests = CounterSeries(
            "mandant_requests", "Calls answered, by gRPC status name.",
            ["tenant", "model", "code"],
        )  # fmt: skip
        self.request_duration = HistogramSeries(
            "mandant_request_duration_seconds",
            "Time from receiving a successful inference call to answering it.",
            ["tenant", "model"], buckets,
        )  # fmt: skip
        self.queue_duration = HistogramSeries(
            "mandant_queue_duration_seconds", "Time a request waited for its batch to run.",
            ["tenant", "model"], buckets,
        )  # fmt: skip
        self.compute_duration = HistogramSeries(
            "mandant_compute_duration_seconds", "Compute time of the batch a request ran in.",
            ["tenant", "model"], buckets,
        )  # fmt: skip
        self.batch_size = HistogramSeries(
            "mandant_batch_size", "Rows per backend execution; tenant: the model's owner "
            "(a private model or tuned variant), \"\" for a shared one.",
            ["model", "tenant"], BATCH_SIZE_BUCKETS,
        )  # fmt: skip
        self.failed_batches = CounterSeries(
            "mandant_failed_batches", "Backend executions that raised (their requests "
            "are then retried apart, so only the ones at fault fail); tenant: the model's "
            "owner, \"\" for a shared model.", ["model", "tenant"],
        )  # fmt: skip
        self.rejections = CounterSeries(
            "mandant_rejections", "Requests refused by admission or a queue cap, by reason; "
            "model: the model whose own limit refused it (\"\" for the tenant's limits).",
            ["tenant", "reason", "model"],
        )  # fmt: skip
        self.rows = CounterSeries(
            "mandant_rows", "Rows executed, for cost allocation.", ["tenant", "model"],
        )  # fmt: skip
        self.compute_seconds = CounterSeries(
            "mandant_compute_seconds",
            "Backend compute time, each batch split among its tenants by rows.",
            ["tenant", "model"],
        )  # fmt: skip
        self.admitted_rows = CounterSeries(
            "mandant_admitted_rows",
            "Rows admitted (mandant_refunded_rows: those given back, the model did not run them).",
            ["tenant", "model"],
        )  # fmt: skip
        self.refunded_rows = CounterSeries(
            "mandant_refunded_rows", "Admitted rows given back: the model did not run for "
            "the call (admitted − refunded is what the quotas kept).",
            ["tenant", "model"],
        )  # fmt: skip
        self.store_errors = CounterSeries(
            "mandant_store_errors", "Failed operations on the shared limits store.", ["store"],
        )  # fmt: skip
        self.slo_requests = CounterSeries(
            "mandant_slo_requests", "Inference calls judged against the tenant's SLO.",
            ["tenant"],
        )  # fmt: skip
        self.slo_good = CounterSeries(
            "mandant_slo_good_requests", "Inference calls answered OK within the SLO latency.",
            ["tenant"],
        )  # fmt: skip
        # Their ratio is the mean group; with ``workers: N``, every front end's.
        self.gather_groups = CounterSeries(
            "mandant_front_gather_groups",
            "Groups of unary calls the gRPC front end held and let go together.", [],
        )  # fmt: skip
        self.gathered_calls = CounterSeries(
            "mandant_front_gathered_calls", "Unary calls let go in those groups.", [],
        )  # fmt: skip
        self.gather_groups.touch(())
        self.gathered_calls.touch(())
        self.slos_changed()
        registry.register(
            SeriesCollector(
                [
                    self.requests, self.request_duration, self.queue_duration,
                    self.compute_duration, self.batch_size, self.failed_batches,
                    self.rejections, self.rows, self.compute_seconds,
                    self.admitted_rows, self.refunded_rows, self.store_errors,
                    self.slo_requests, self.slo_good, self.gather_groups,
                    self.gathered_calls,
                ]
            )
        )  # fmt: skip
        registry.register(SloTargets(self._directory))
        #: What the usage counters held for models no longer served (:meth:`forget`):
        #: by counter and labels, the model's name kept for rows and compute seconds
        #: (cost by model), "" for the others (a report counts them per tenant only).
        self._forgotten: dict[tuple[CounterSeries, Labels], float] = {}

    def slos_changed(self) -> None:
        """Expose every tenant's SLO counters at 0 before its first call: the alerts
        and dashboards divide the rate of good calls by the rate of all, which gives
        nothing, not 0, for a tenant with no good-calls series (a tenant given its SLO
        by a reload, whose calls all failed, was never alerted on); and drop those of
        tenants that have none now (their objective's series went, the counters
        stayed)."""
        slos = self._directory.current.slos
        for series in (self.slo_requests, self.slo_good):
            series.drop(lambda labels: labels[0] not in slos)  # an SLO a reload took away
            for tenant in slos:
                series.touch((tenant,))

    def _usage_series(self) -> tuple[CounterSeries, ...]:
        return (self.requests, self.rows, self.compute_seconds, self.rejections,
                self.admitted_rows)  # fmt: skip

    def _tenant_series(self) -> tuple[CounterSeries | HistogramSeries, ...]:
        """The series labelled with a tenant."""
        return (self.requests, self.request_duration, self.queue_duration,
                self.compute_duration, self.rejections, self.rows, self.compute_seconds,
                self.admitted_rows, self.refunded_rows, self.slo_requests,
                self.slo_good)  # fmt: skip

    def usage_counts(
        self, tenant: str | None = None
    ) -> Iterable[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of the counters a usage report reads: only
        those, not every series of the registry (the histograms are most of a scrape,
        and a tenant's own ``/usage`` must not cost a full one); and what they held
        for models no longer served. ``tenant``: that tenant's only (None: every
        tenant's), picked before anything is built for the others' (one tenant's
        report walked every tenant's series: 7.8 ms of event loop with 300 tenants,
        0.6 ms so)."""
        where = None if tenant is None else ("tenant", tenant)
        for series in self._usage_series():
            name = f"{series.name}_total"
            for named, value in series.values(where):
                yield name, named, value
        for (series, labels), value in self._forgotten.items():
            if tenant is None or labels[series.labelnames.index("tenant")] == tenant:
                named = dict(zip(series.labelnames, labels, strict=True))
                yield f"{series.name}_total", named, value

    def forget_tenants(self, tenants: Collection[str]) -> None:
        """Drop every series of ``tenants`` and what their usage counters held (kept
        aside: :meth:`retire_tenants`, :meth:`forget`): ids a reload added back after an
        earlier one removed them (a removed tenant's counts stay until then, for its
        last usage report).
        A tenant added under an id must not read the counts of the one before as its
        own; Prometheus keeps what it scraped of them."""
        for series in self._tenant_series():
            series.drop(_labelled(series.labelnames.index("tenant"), tenants))
        for series, labels in list(self._forgotten):
            if labels[series.labelnames.index("tenant")] in tenants:
                del self._forgotten[series, labels]

    def retire_tenants(self, tenants: Collection[str]) -> None:
        """A reload removed ``tenants``: their series leave ``/metrics`` (kept, they
        made every scrape longer for the life of the process, a tenant at a time), what
        their usage counters held kept aside for their last usage report, as a model's
        no longer served is (:meth:`forget`)."""
        usage = self._usage_series()
        for series in self._tenant_series():
            at = series.labelnames.index("tenant")
            if not isinstance(series, CounterSeries) or series not in usage:
                series.drop(_labelled(at, tenants))
                continue
            for labels, value in series.drop(_labelled(at, tenants)):
                self._aside(series, labels, value)

    def forget(self, served: ServedModels) -> None:
        """Drop the series of the models ``served`` does not list (see the module
        doc): those labelled with the model's name, and its owner's batch series (a
        tenant's variant gone, the shared model of that name serving on)."""
        for histogram in (self.request_duration, self.queue_duration, self.compute_duration):
            histogram.drop(_model_gone(served, histogram.labelnames.index("model")))
        usage = self._usage_series()
        for counter in (self.requests, self.rejections, self.rows, self.compute_seconds,
                        self.admitted_rows, self.refunded_rows):  # fmt: skip
            at = counter.labelnames.index("model")
            gone = counter.drop(_model_gone(served, at))
            if counter not in usage:
                continue
            by_model = counter in (self.rows, self.compute_seconds)
            for labels, value in gone:
                kept = labels if by_model else (*labels[:at], "", *labels[at + 1 :])
                self._aside(counter, kept, value)
        for owned in (self.batch_size, self.failed_batches):  # labels: (model, owner)
            owned.drop(lambda labels: labels[0] != "" and not served.serves(*labels))

    def _tenant(self, tenant: str) -> str | None:
        """The tenant label of ``tenant``'s events: its id if it is configured; None if
        a reload removed it while its call ran (its series went with it, and a tenant
        added back under its id must not read its last calls as its own: only its usage
        counts are kept, aside, :meth:`_aside`); else ``""`` (no tenant)."""
        directory = self._directory
        if tenant in directory.current.ids:
            return tenant
        return None if tenant in directory.ever else ""

    def _aside(self, series: CounterSeries, labels: Labels, value: float = 1.0) -> None:
        """A usage count kept aside for usage reports, not in ``/metrics``: what the
        counters of a model no longer served (:meth:`forget`) or of a tenant a reload
        removed held (:meth:`retire_tenants`), and that tenant's calls that end later."""
        self._forgotten[series, labels] = self._forgotten.get((series, labels), 0.0) + value

    def _model(self, model: str) -> str:
        return model if model in self._models else ""

    # -- Observer --------------------------------------------------------------------

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
        snapshot = self._directory.current
        if model not in self._models:
            model = ""
        if tenant not in snapshot.ids:
            label = self._tenant(tenant)
            if label is None:
                self._aside(self.requests, (tenant, model, code))
                return
            tenant = label
        self.requests.inc((tenant, model, code))
        if (code not in SLO_CODES and not busy) or not (model or inference):
            return
        if code == "OK":
            self.request_duration.observe((tenant, model), duration_s)
        if self._live is not None:
            self._live.record_request(tenant, code, duration_s)
        threshold = snapshot.slo_thresholds_s.get(tenant)
        if threshold is None:
            return
        good = is_good(code, duration_s, threshold)
        self.slo_requests.inc((tenant,))
        if good:
            self.slo_good.inc((tenant,))
        if self._slo is not None:
            self._slo.record(tenant, good)

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        label = self._tenant(tenant)
        if label is None:
            return
        labels = (label, self._model(model))
        self.queue_duration.observe(labels, queue_s)
        self.compute_duration.observe(labels, compute_s)

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        model, label = self._model(model), self._tenant(owner)
        if label is not None:  # a removed tenant's model: its series went with it
            self.batch_size.observe((model, label), size)
            if self._live is not None:
                self._live.record_batch(model, size, label)
        total_rows = sum(rows_by_tenant.values()) or 1
        for tenant, rows in rows_by_tenant.items():
            label, share = self._tenant(tenant), compute_s * rows / total_rows
            if label is None:
                self._aside(self.rows, (tenant, model), rows)
                self._aside(self.compute_seconds, (tenant, model), share)
                continue
            self.rows.inc((label, model), rows)
            self.compute_seconds.inc((label, model), share)

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        label = self._tenant(owner)
        if label is not None:  # a removed tenant's model: not the shared one's ("")
            self.failed_batches.inc((self._model(model), label))

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        label = self._tenant(tenant)
        if label is None:
            self._aside(self.admitted_rows, (tenant, self._model(model)), rows)
            return
        self.admitted_rows.inc((label, self._model(model)), rows)
        if self._live is not None:
            self._live.record_admitted(label, rows)

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        label = self._tenant(tenant)
        if label is None:  # its refunded rows' series went with it (no usage count)
            return
        self.refunded_rows.inc((label, self._model(model)), rows)
        if self._live is not None:
            self._live.record_refunded(label, rows, admitted_at)

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        label, model = self._tenant(tenant), self._model(model)
        if label is None:
            self._aside(self.rejections, (tenant, reason, model))
            return
        self.rejections.inc((label, reason, model))
        if self._live is not None:
            self._live.record_rejection(label, reason, model)

    def store_error(self, store: str) -> None:
        self.store_errors.inc((store,))

    def calls_gathered(self, calls: int) -> None:
        self.gather_groups.inc(())
        self.gathered_calls.inc((), calls)


def _labelled(at: int, values: Collection[str]) -> Dropped:
    """The series whose label at ``at`` is one of ``values``."""
    return lambda labels: labels[at] in values


def _model_gone(served: ServedModels, at: int) -> Dropped:
    """Picks the series whose model (label ``at``) is not served; ``""`` (no model)
    always stays."""
    return lambda labels: labels[at] != "" and not served.serves(labels[at])


class InflightRequests:
    """``mandant_inflight_requests{tenant}``, read at scrape time from ``counts``: the
    admission's count of each tenant's calls in flight (the one it caps), not a copy
    kept from events. Every configured tenant is shown; a tenant that a reload removed
    while calls of it were in flight, under its own id until they end."""

    def __init__(self, directory: TenantDirectory, counts: Callable[[], Mapping[str, int]]) -> None:
        self._directory = directory
        self._counts = counts

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        counts = self._counts()
        configured = self._directory.current.ids
        for tenant in configured:
            family.add_metric([tenant], counts.get(tenant, 0))
        for tenant, calls in counts.items():
            if calls and tenant not in configured:
                family.add_metric([tenant], calls)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mandant_inflight_requests", "Calls being served now.", labels=["tenant"]
        )


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
    """``mandant_model_ready{model,version,tenant}``: 1 while a model version can serve;
    ``mandant_backend_circuit_open{model,version,tenant}``: 1 while its backend's
    circuit breaker refuses its calls (a Triton that answers none), for every tenant
    alike; both read at scrape time. ``tenant`` is the owner of a private or tuned
    model, ``""`` for shared ones; every label comes from the configuration."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, str, str, bool, bool]]]) -> None:
        """``models``: (name, version, owner, ready, circuit open) of each model."""
        self._models = models

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        ready, circuit = self._families()
        for name, version, owner, is_ready, is_open in self._models():
            ready.add_metric([name, version, owner], 1.0 if is_ready else 0.0)
            circuit.add_metric([name, version, owner], 1.0 if is_open else 0.0)
        return [ready, circuit]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["model", "version", "tenant"]
        return (
            GaugeMetricFamily(
                "mandant_model_ready",
                "1 while the model version is ready to serve, else 0.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "mandant_backend_circuit_open",
                "1 while the model version's backend is taken for failing and its calls "
                "are refused (but a probe), else 0.",
                labels=labels,
            ),
        )


def load_failures(registry: CollectorRegistry) -> Counter:
    """``mandant_model_load_failures_total{model}``: model versions that failed to
    load (at start or on a RepositoryModelLoad); ``model`` comes from the configuration."""
    return Counter(
        "mandant_model_load_failures_total",
        "Model versions that failed to load.",
        ["model"],
        registry=registry,
    )


def forget_load_failures(failures: Counter, served: ServedModels) -> None:
    """Drop the :func:`load_failures` series of models no longer served (as
    :meth:`PrometheusObserver.forget`)."""
    names = {sample.labels["model"] for family in failures.collect() for sample in family.samples}
    for name in names:
        if not served.serves(name):
            failures.remove(name)
