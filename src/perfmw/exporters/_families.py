"""Metric families whose hot path is a list increment, read by a collector at scrape time.

prometheus-client's metrics take a lock and walk their buckets on every observation; a request
observing four of them costs about 9 µs. These families keep plain accumulators per label
combination (looked up once, then reused) and build the exposition only when scraped. They
mirror prometheus-client's child API (`labels(...).observe/inc/dec/set`).

Multiprocess mode keeps the same accumulators: the sink copies them into prometheus-client's
per-process mmap files once a second and at each scrape (exporters/prometheus.py), so a request
costs the same in both modes.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from prometheus_client import values as _values
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar

#: How `MultiProcessCollector` merges a gauge's per-process values ("live" ones forget the
#: processes `mark_process_dead` was called for).
MultiprocessMode = Literal[
    "all",
    "liveall",
    "min",
    "livemin",
    "max",
    "livemax",
    "sum",
    "livesum",
    "mostrecent",
    "livemostrecent",
]


def multiprocess_enabled() -> bool:
    """True when prometheus-client writes its values to per-process mmap files."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def _format_bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


class HistogramChild:
    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] | None = None

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        index = bisect_left(self.bounds, value)
        self.counts[index] += 1
        self.sum += value
        if exemplar is not None:
            if self.exemplars is None:
                self.exemplars = [None] * len(self.counts)
            self.exemplars[index] = Exemplar(exemplar, value, time.time())


class CounterChild:
    __slots__ = ("exemplar", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.exemplar: Exemplar | None = None

    def inc(self, amount: float = 1.0, exemplar: dict[str, str] | None = None) -> None:
        self.value += amount
        if exemplar is not None:
            self.exemplar = Exemplar(exemplar, amount, time.time())


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Family:
    """One metric name: its children per label values, and how to expose them."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if b != math.inf)
        self.children: dict[tuple[str, ...], HistogramChild | CounterChild | GaugeChild] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            # Exposed at 0 from the start, as prometheus-client does, so that the first event
            # is an increase that rate() and increase() can see.
            self.children[()] = self._new_child()

    def labels(self, *values: str) -> HistogramChild | CounterChild | GaugeChild:
        child = self.children.get(values)
        if child is None:
            with self._lock:
                child = self.children.get(values)
                if child is None:
                    child = self._new_child()
                    self.children[values] = child
        return child

    def _new_child(self) -> HistogramChild | CounterChild | GaugeChild:
        if self.kind == "histogram":
            return HistogramChild(self.bounds)
        if self.kind == "counter":
            return CounterChild()
        return GaugeChild()

    def collect(self) -> Metric:
        items = list(self.children.items())
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            bounds = [*self.bounds, math.inf]
            for values, child in items:
                assert isinstance(child, HistogramChild)
                counts = list(child.counts)
                exemplars = child.exemplars
                cumulative = 0
                buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
                for index, bound in enumerate(bounds):
                    cumulative += counts[index]
                    example = exemplars[index] if exemplars is not None else None
                    if example is None:
                        buckets.append((_format_bound(bound), cumulative))
                    else:
                        buckets.append((_format_bound(bound), cumulative, example))
                histogram.add_metric(list(values), buckets, child.sum)
            return histogram
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, child in items:
                assert isinstance(child, CounterChild)
                counter.add_metric(list(values), child.value, exemplar=child.exemplar)
            return counter
        gauge = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in items:
            assert isinstance(child, GaugeChild)
            gauge.add_metric(list(values), child.value)
        return gauge


def gauge_from(
    name: str,
    documentation: str,
    labelnames: Sequence[str],
    read: Callable[[], Iterable[tuple[Sequence[str], float]]],
) -> Metric:
    """A gauge whose samples are read now, at scrape time."""
    metric = GaugeMetricFamily(name, documentation, labels=labelnames)
    for values, value in read():
        metric.add_metric(list(values), value)
    return metric
