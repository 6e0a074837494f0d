"""Prometheus sink: the metrics of DESIGN.md, one set per registry, exposed at scrape time.

Two apps instrumented against the same registry share one sink (no "Duplicated timeseries");
apps with their own registries never see each other's requests.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import _guard
from ..record import RequestRecord
from ._families import CounterChild, Family, GaugeChild, HistogramChild

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
QUERY_COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

#: A source of extra metric families read at scrape time (caches, pools, loop lag...).
MetricSource = Callable[[], Iterable[Metric]]


class _RouteMetrics:
    """The request metrics of one (method, route, status): looked up once, reused."""

    __slots__ = ("body", "db", "duration", "queries")

    def __init__(
        self,
        duration: HistogramChild,
        body: HistogramChild,
        queries: HistogramChild,
        db: HistogramChild,
    ):
        self.duration = duration
        self.body = body
        self.queries = queries
        self.db = db


class PrometheusSink(Collector):
    """All of perfmw's metrics for one registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_duration = Family(
            "histogram",
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests, to the last body chunk.",
            ("http_request_method", "http_route", "http_response_status_code"),
            DURATION_BUCKETS,
        )
        self.http_active = Family(
            "gauge",
            "http_server_active_requests",
            "Number of active HTTP server requests.",
            ("http_request_method",),
        )
        self.http_body = Family(
            "histogram",
            "http_server_response_body_size_bytes",
            "Size of HTTP server response bodies, counted from the chunks sent.",
            ("http_request_method", "http_route"),
            SIZE_BUCKETS,
        )
        self.request_queries = Family(
            "histogram",
            "perfmw_request_db_queries",
            "MongoDB queries per request.",
            ("http_request_method", "http_route"),
            QUERY_COUNT_BUCKETS,
        )
        # Per route, so that the report can say which share of a route's time MongoDB takes.
        self.request_db_seconds = Family(
            "histogram",
            "perfmw_request_db_seconds",
            "Time spent in MongoDB commands per request.",
            ("http_request_method", "http_route"),
            DB_BUCKETS,
        )
        self.db_duration = Family(
            "histogram",
            "db_client_operation_duration_seconds",
            "Duration of MongoDB commands sent by the application.",
            ("db_system_name", "db_operation_name", "db_collection_name"),
            DB_BUCKETS,
        )
        self.pool_wait = Family(
            "histogram",
            "db_client_connection_wait_time_seconds",
            "Time to check a connection out of the MongoDB pool.",
            ("db_client_connection_pool_name",),
            DB_BUCKETS,
        )
        self.n_plus_one = Family(
            "counter",
            "perfmw_n_plus_one",
            "Requests in which an N+1 query pattern was detected.",
            ("http_route", "db_collection_name", "db_operation_name"),
        )
        self.slow_queries = Family(
            "counter",
            "perfmw_slow_queries",
            "MongoDB commands slower than slow_query_seconds.",
            ("db_collection_name", "db_operation_name"),
        )
        self.stalls = Family(
            "counter",
            "perfmw_event_loop_stalls",
            "Event loop stalls longer than stall_threshold_seconds.",
            ("http_route", "cause"),
        )
        self.stall_seconds = Family(
            "histogram",
            "perfmw_event_loop_stall_seconds",
            "Whole duration of each event loop stall.",
            (),
            STALL_BUCKETS,
        )
        self.gc_pause = Family(
            "histogram",
            "perfmw_gc_pause_seconds",
            "Duration of garbage collections.",
            ("generation",),
            GC_BUCKETS,
        )
        self.blocking_calls = Family(
            "counter",
            "perfmw_blocking_calls",
            "Known blocking calls made on the event loop's thread.",
            ("http_route", "kind"),
        )
        self._families = (
            self.http_duration,
            self.http_active,
            self.http_body,
            self.request_queries,
            self.request_db_seconds,
            self.db_duration,
            self.pool_wait,
            self.n_plus_one,
            self.slow_queries,
            self.stalls,
            self.stall_seconds,
            self.gc_pause,
            self.blocking_calls,
        )
        self._routes: dict[tuple[str, str, int], _RouteMetrics] = {}
        self._active: dict[str, GaugeChild] = {}
        self._sources: list[MetricSource] = []

    # Hot path: one request.

    def active(self, method: str) -> GaugeChild:
        child = self._active.get(method)
        if child is None:
            child = self._active[method] = self.http_active.labels(method)  # type: ignore[assignment]
        return child  # type: ignore[return-value]

    def observe_request(self, record: RequestRecord, exemplar: dict[str, str] | None) -> None:
        key = (record.method, record.route, record.status_code or 0)
        metrics = self._routes.get(key)
        if metrics is None:
            metrics = self._route_metrics(key)
        duration = record.duration_seconds or 0.0
        db_seconds = record.db_seconds if record.queries else 0.0
        with self._lock:
            metrics.duration.observe(duration, exemplar)
            metrics.body.observe(record.response_bytes)
            metrics.queries.observe(len(record.queries))
            metrics.db.observe(db_seconds)

    def _route_metrics(self, key: tuple[str, str, int]) -> _RouteMetrics:
        method, route, status = key
        metrics = _RouteMetrics(
            self.http_duration.labels(method, route, str(status)),  # type: ignore[arg-type]
            self.http_body.labels(method, route),  # type: ignore[arg-type]
            self.request_queries.labels(method, route),  # type: ignore[arg-type]
            self.request_db_seconds.labels(method, route),  # type: ignore[arg-type]
        )
        self._routes[key] = metrics
        return metrics

    # Per finished record: what its detectors and sources found.

    def observe_record(self, record: RequestRecord) -> None:
        route = record.route
        with self._lock:
            for finding in record.findings:
                if finding.kind == "n_plus_one":
                    self._counter(
                        self.n_plus_one,
                        route,
                        str(finding.detail.get("collection", "")),
                        str(finding.detail.get("operation", "")),
                    ).inc(finding.count)
                elif finding.kind == "slow_query":
                    self._counter(
                        self.slow_queries,
                        str(finding.detail.get("collection", "")),
                        str(finding.detail.get("operation", "")),
                    ).inc(finding.count)
            for stall in record.stalls:
                self._counter(self.stalls, route, stall.cause).inc()
                self.stall_seconds.labels().observe(stall.duration_seconds)  # type: ignore[union-attr]
            for call in record.blocking_calls:
                self._counter(self.blocking_calls, route, call.kind).inc()

    @staticmethod
    def _counter(family: Family, *values: str) -> CounterChild:
        return family.labels(*values)  # type: ignore[return-value]

    # Per event, from process-wide sources.

    def observe_command(
        self, operation: str, collection: str, seconds: float, exemplar: dict[str, str] | None
    ) -> None:
        child = self.db_duration.labels("mongodb", operation, collection)
        with self._lock:
            child.observe(seconds, exemplar)  # type: ignore[union-attr]

    def observe_pool_wait(self, pool: str, seconds: float) -> None:
        child = self.pool_wait.labels(pool)
        with self._lock:
            child.observe(seconds)  # type: ignore[union-attr]

    def observe_gc(self, generation: int, seconds: float) -> None:
        child = self.gc_pause.labels(str(generation))
        with self._lock:
            child.observe(seconds)  # type: ignore[union-attr]

    def add_source(self, source: MetricSource) -> None:
        """Register a scrape-time reader of extra metric families (once per source)."""
        if source not in self._sources:
            self._sources.append(source)

    def remove_source(self, source: MetricSource) -> None:
        if source in self._sources:
            self._sources.remove(source)

    # Scrape time.

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            metrics = [family.collect() for family in self._families]
        yield from metrics
        yield _internal_errors_counter()
        for source in list(self._sources):
            with _guard.guard("metrics"):
                yield from list(source())


def _internal_errors_counter() -> Metric:
    counter = CounterMetricFamily(
        "perfmw_internal_errors",
        "perfmw's own errors, swallowed so that the application goes on.",
        labels=("component",),
    )
    for component, n in sorted(_guard.error_counts.items()):
        counter.add_metric([component], n)
    return counter


_sinks: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusSink] = weakref.WeakKeyDictionary()
_sinks_lock = threading.Lock()


def sink_for(registry: CollectorRegistry | None = None) -> PrometheusSink:
    """The registry's sink, created and registered the first time (never twice)."""
    registry = REGISTRY if registry is None else registry
    with _sinks_lock:
        sink = _sinks.get(registry)
        if sink is None:
            sink = PrometheusSink()
            registry.register(sink)
            _sinks[registry] = sink
        return sink


def live_sinks() -> list[PrometheusSink]:
    with _sinks_lock:
        return list(_sinks.values())


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's exposition, OpenMetrics when the scraper asks for it."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
