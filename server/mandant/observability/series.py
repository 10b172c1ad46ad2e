"""Counters and histograms kept as plain Python numbers, exposed to a
Prometheus ``CollectorRegistry`` by :class:`SeriesCollector` when it is scraped.

Why: prometheus_client's labelled metrics take a lock on every ``inc`` and two on
every ``observe``; the observer runs on the event loop thread only, so here an
update is one dict lookup and an addition, and the totals are read at scrape time
(also on the loop thread). The families, sample names, labels, bucket bounds and
``_created`` samples are the ones prometheus_client's own Counter and
Histogram would expose.
"""

from __future__ import annotations

import bisect
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mandant.heap import collector_paused

Labels = tuple[str, ...]
#: Which series to drop, by their label values.
Dropped = Callable[[Labels], bool]


class CounterSeries:
    """A labelled counter: ``inc(labels, amount)``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._cells: dict[Labels, list[float]] = {}  # [value, created]
        #: The series of each tenant (where there is a ``tenant`` label), so that one
        #: tenant's usage report reads its own, not every tenant's (22 ms of event loop
        #: a report with 3,000 tenants).
        self._tenant_at = self.labelnames.index("tenant") if "tenant" in labelnames else None
        self._by_tenant: dict[str, dict[Labels, None]] = {}  # in the order they came

    def touch(self, labels: Labels) -> None:
        """Expose the series at 0 before anything is counted."""
        if labels not in self._cells:
            self._add(labels)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._add(labels)
        cell[0] += amount

    def _add(self, labels: Labels) -> list[float]:
        cell = self._cells[labels] = [0.0, time.time()]
        if self._tenant_at is not None:
            self._by_tenant.setdefault(labels[self._tenant_at], {})[labels] = None
        return cell

    def drop(self, dropped: Dropped) -> list[tuple[Labels, float]]:
        """Remove the series ``dropped`` picks (their object is gone: Prometheus
        treats a counter that vanishes as ended); returns their last values."""
        gone = [(labels, cell[0]) for labels, cell in self._cells.items() if dropped(labels)]
        at = self._tenant_at
        for labels, _ in gone:
            del self._cells[labels]
            if at is not None:
                own = self._by_tenant[labels[at]]
                del own[labels]
                if not own:
                    del self._by_tenant[labels[at]]
        return gone

    def values(
        self, where: tuple[str, str] | None = None
    ) -> Iterable[tuple[dict[str, str], float]]:
        """(labels by name, value) of every series, as a scrape reads them; ``where``:
        only those whose label ``where[0]`` is ``where[1]`` (a tenant's read alone)."""
        names = self.labelnames
        if where is None:
            chosen: Iterable[Labels] = self._cells
        elif where[0] == "tenant" and self._tenant_at is not None:
            chosen = self._by_tenant.get(where[1], ())
        else:
            at = names.index(where[0])
            chosen = [labels for labels in self._cells if labels[at] == where[1]]
        cells = self._cells
        for labels in chosen:
            yield dict(zip(names, labels, strict=True)), cells[labels][0]

    def family(self, with_samples: bool = True) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for labels, (value, created) in self._cells.items():
                family.add_metric(labels, value, created=created)
        return family

    def frozen(self) -> CounterSeries:
        """The series as it is now, for a scrape to write in a thread (:class:`Scrape`):
        the dict of its cells copied (its cells themselves are read as they are then)."""
        frozen = copy.copy(self)
        frozen._cells = self._cells.copy()
        return frozen


class _HistogramCell:
    __slots__ = ("counts", "created", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0
        self.created = time.time()


class HistogramSeries:
    """A labelled histogram over fixed upper bounds: ``observe(labels, value)``."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Iterable[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._cells: dict[Labels, _HistogramCell] = {}

    def observe(self, labels: Labels, value: float) -> None:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = _HistogramCell(len(self._bounds) + 1)
        cell.counts[bisect.bisect_left(self._bounds, value)] += 1
        cell.total += value

    def drop(self, dropped: Dropped) -> None:
        """Remove the series ``dropped`` picks (see :meth:`CounterSeries.drop`)."""
        for labels in [labels for labels in self._cells if dropped(labels)]:
            del self._cells[labels]

    def family(self, with_samples: bool = True) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if not with_samples:
            return family
        for labels, cell in self._cells.items():
            cumulative, buckets = 0, []
            # A copy: the loop may add to it while a scrape's thread reads it (``frozen``).
            for le, count in zip(self._les, cell.counts.copy(), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(labels, buckets, cell.total)
            family.add_sample(
                f"{self.name}_created", dict(zip(self.labelnames, labels, strict=True)),
                cell.created,
            )  # fmt: skip
        return family

    def frozen(self) -> HistogramSeries:
        """As :meth:`CounterSeries.frozen`."""
        frozen = copy.copy(self)
        frozen._cells = self._cells.copy()
        return frozen


Series = CounterSeries | HistogramSeries


class SeriesCollector:
    """Exposes series to a registry (``registry.register(SeriesCollector(...))``)."""

    def __init__(self, series: Iterable[Series]) -> None:
        self._series = tuple(series)

    def describe(self) -> list[Metric]:
        return [s.family(with_samples=False) for s in self._series]

    def collect(self) -> Iterator[Metric]:
        # A family at a time: a scrape's thread frees each once written (freed all
        # at once, 178,000 samples held the event loop 150 ms).
        return (s.family() for s in self._series)

    def frozen(self) -> SeriesCollector:
        """The series as they are now (:meth:`CounterSeries.frozen`)."""
        return SeriesCollector(s.frozen() for s in self._series)


class Registry(CollectorRegistry):
    """The server's registry, which a scrape reads in two steps (:meth:`scrape`)."""

    def __init__(self) -> None:
        super().__init__()
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._collectors.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._collectors.remove(collector)

    def scrape(self) -> Scrape:
        """What a scrape writes, taken now, on the event loop that updates it: every
        collector's families, except the series', whose cells are copied (a dict copy
        each) to be made into samples where the scrape is written, in a thread
        (written on the loop, 1,000 tenants' series held every call for 3.5 s, and
        with ``workers: N`` an engine that said nothing for 5 s was taken for gone)."""
        parts: list[SeriesCollector | list[Metric]] = [
            c.frozen() if isinstance(c, SeriesCollector) else list(c.collect())
            for c in self._collectors
        ]
        return Scrape(parts)


class _Family(Collector):
    """One family as a collector, for ``generate_latest`` to write alone."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterator[Metric]:
        yield self._family


class Scrape:
    """A registry's families as :meth:`Registry.scrape` took them: a collector of its
    own for ``generate_latest`` to read in a thread (:meth:`text`)."""

    def __init__(self, parts: Sequence[SeriesCollector | list[Metric]]) -> None:
        self._parts = parts

    def text(self) -> bytes:
        """The exposition, written with the cyclic collector paused: its samples (a few
        hundred thousand objects) made full collections that, holding the GIL, held
        the event loop 150-200 ms each; they are freed as they are written. A family
        at a time (the same text: ``generate_latest`` writes each on its own): it
        joined, encoded and freed the lines of all of them in single calls that hold
        the GIL, and so the event loop (1,000,000 lines, 400 tenants x 30 models:
        178 ms in one stretch)."""
        with collector_paused():
            return b"".join(generate_latest(_Family(family)) for family in self.collect())

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            yield from part.collect() if isinstance(part, SeriesCollector) else part
