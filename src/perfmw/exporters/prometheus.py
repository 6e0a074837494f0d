"""Prometheus sink: the metrics of DESIGN.md, one set per registry, exposed at scrape time.

Two apps instrumented against the same registry share one sink (no "Duplicated timeseries");
apps with their own registries never see each other's requests.

Multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set before the workers start; docs/production.md):
each worker keeps counting in the same in-memory families (a request costs the same as in one
process) and copies them, with its scrape-time readings (sources, internal errors), into
prometheus-client's per-process mmap files every second, at each scrape it answers and at a
clean exit; `/metrics` serves `MultiProcessCollector`'s sum over every worker of the directory.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import values as _values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .. import _guard
from ..findings import Finding
from ..record import MACHINE_CAUSES, OTHER, RequestRecord
from . import multiprocess_files, shared_findings
from ._families import (
    CounterChild,
    Family,
    GaugeChild,
    HistogramChild,
    MultiprocessMode,
    multiprocess_enabled,
)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
QUERY_COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

#: A source of extra metric families read at scrape time (caches, pools, loop lag...).
MetricSource = Callable[[], Iterable[Metric]]

#: Multiprocess mode: how each gauge's per-worker values add up (others: "livesum"). Sums where
#: the workers' values are parts of one whole (requests in flight, connections, cache entries);
#: the worst live worker for loop lag, since one stuck worker is what an operator must see.
GAUGE_MODES: dict[str, MultiprocessMode] = {
    "http_server_active_requests": "livesum",
    "db_client_connection_count": "livesum",
    "perfmw_cache_size": "livesum",
    "perfmw_cache_max_size": "livesum",
    "perfmw_event_loop_lag_seconds": "livemax",
}
#: Multiprocess mode: how often each worker copies its scrape-time readings to its files.
FLUSH_SECONDS = 1.0
FINDING_LABELS = ("kind", "http_route", "location")
UNKNOWN_LOCATION = "<unknown>"  # a finding with no application frame


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


#: One finished HTTP request, as the middleware queues it: (method, route, status), duration,
#: body bytes, queries, DB seconds, exemplar.
RequestObservation = tuple[tuple[str, str, int], float, int, int, float, "dict[str, str] | None"]
#: Requests queued before the middleware folds them into the histograms: bounds the queue.
FOLD_BATCH = 256
_QUERY_BUCKET_INDEX = [bisect_left(QUERY_COUNT_BUCKETS, n) for n in range(101)]


class PrometheusSink(Collector):
    """All of perfmw's metrics for one registry."""

    def __init__(self) -> None:
        self.multiprocess = _multiprocess_check()
        # Reentrant: a finalizer run by a collection in the middle of an observation (a
        # cursor's killCursors reaching the MongoDB listener) must not deadlock its thread.
        self._lock = threading.RLock()
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
        # Its children by (operation, collection), looked up on every command.
        self._commands: dict[tuple[str, str], HistogramChild] = {}
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
            "Whole duration of each event loop stall the code caused (not starved/throttled).",
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
        # Every finding, so that Prometheus sums them over replicas and alerts name the line.
        self.findings = Family(
            "counter",
            "perfmw_findings",
            "Findings (each request's N+1, each stall...) by kind, route and application line.",
            FINDING_LABELS,
        )
        self.finding_seconds = Family(
            "counter",
            "perfmw_finding_seconds",
            "Time the findings cost, by kind, route and application line.",
            FINDING_LABELS,
        )
        self._locations: set[str] = set()  # distinct `location` values so far (bounded)
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
            self.findings,
            self.finding_seconds,
        )
        self._routes: dict[tuple[str, str, int], _RouteMetrics] = {}
        # Finished HTTP requests, appended by the middleware (a tuple each: the cheapest thing
        # a request can do; measured 1.4 µs less per request than observing in place) and
        # folded into the histograms FOLD_BATCH at a time, with warm caches, and before every
        # scrape or copy to the multiprocess files.
        self.requests: deque[RequestObservation] = deque()
        self.active_requests: dict[str, GaugeChild] = {}  # per method, see active()
        self._sources: list[MetricSource] = []
        self._writer = _MmapWriter() if self.multiprocess else None

    # Hot path: one request.

    def active(self, method: str) -> GaugeChild:
        child = self.active_requests.get(method)
        if child is None:
            child = self.active_requests[method] = self.http_active.labels(method)  # type: ignore[assignment]
        return child  # type: ignore[return-value]

    def fold(self) -> None:
        """Observe the queued requests (safe from any thread: appends may go on meanwhile)."""
        pending = self.requests
        routes = self._routes
        with self._lock:
            while pending:
                key, duration, size, queries, db_seconds, exemplar = pending.popleft()
                metrics = routes.get(key)
                if metrics is None:
                    metrics = self._route_metrics(key)
                # The four observations inlined: a call each (or one per request) would cost
                # more than the work.
                histogram = metrics.duration
                if exemplar is not None:
                    histogram.observe(duration, exemplar)
                else:
                    histogram.counts[bisect_left(histogram.bounds, duration)] += 1
                    histogram.sum += duration
                histogram = metrics.body
                histogram.counts[bisect_left(histogram.bounds, size)] += 1
                histogram.sum += size
                if not queries:  # most requests: both land in the first bucket, add nothing
                    metrics.queries.counts[0] += 1
                    metrics.db.counts[0] += 1
                    continue
                histogram = metrics.queries
                histogram.counts[_QUERY_BUCKET_INDEX[queries] if queries <= 100 else -1] += 1
                histogram.sum += queries
                histogram = metrics.db
                histogram.counts[bisect_left(histogram.bounds, db_seconds)] += 1
                histogram.sum += db_seconds

    def observe_background(self, record: RequestRecord) -> None:
        """The queries of a request's background tasks, under `<route> (background)`."""
        with self._lock:
            labels = (record.method, record.route)
            self.request_queries.labels(*labels).observe(record.db_queries)  # type: ignore[union-attr]
            self.request_db_seconds.labels(*labels).observe(record.db_seconds)  # type: ignore[union-attr]

    def _route_metrics(self, key: tuple[str, str, int]) -> _RouteMetrics:
        if self.multiprocess:
            _flusher.ensure_running()  # in a worker forked from a master that built the sink
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
                if stall.cause not in MACHINE_CAUSES:  # what alerts page on: the code's stalls
                    self.stall_seconds.labels().observe(stall.duration_seconds)  # type: ignore[union-attr]
            for call in record.blocking_calls:
                self._counter(self.blocking_calls, route, call.kind).inc()

    def observe_findings(
        self, found: Iterable[Finding], exemplar: dict[str, str] | None, max_locations: int
    ) -> None:
        """Count new findings; past `max_locations` distinct lines, the rest are `<other>`."""
        with self._lock:
            locations = self._locations
            for finding in found:
                location = finding.location or UNKNOWN_LOCATION
                if location not in locations:
                    if len(locations) >= max_locations:
                        location = OTHER
                    else:
                        locations.add(location)
                labels = (finding.kind, finding.route, location)
                self._counter(self.findings, *labels).inc(finding.count, exemplar)
                self._counter(self.finding_seconds, *labels).inc(finding.total_seconds)

    @staticmethod
    def _counter(family: Family, *values: str) -> CounterChild:
        return family.labels(*values)  # type: ignore[return-value]

    # Per event, from process-wide sources.

    def observe_command(
        self, operation: str, collection: str, seconds: float, exemplar: dict[str, str] | None
    ) -> None:
        child = self._commands.get((operation, collection))
        if child is None:  # once per (operation, collection): the family has no more children
            made = self.db_duration.labels("mongodb", operation, collection)
            assert isinstance(made, HistogramChild)
            child = self._commands[(operation, collection)] = made
        lock = self._lock  # acquire/release: `with` costs twice as much, on every command
        lock.acquire()
        try:
            if exemplar is None:  # HistogramChild.observe inlined: this runs for every command
                child.counts[bisect_left(child.bounds, seconds)] += 1
                child.sum += seconds
            else:
                child.observe(seconds, exemplar)
        finally:
            lock.release()

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
        if self.multiprocess:
            _flusher.ensure_running()

    def remove_source(self, source: MetricSource) -> None:
        if source in self._sources:
            self._sources.remove(source)

    # Scrape time.

    def collect(self) -> Iterator[Metric]:
        if self.multiprocess:
            # Everything is in the mmap files, exposed by exposition()'s MultiProcessCollector;
            # yielding it here too would duplicate it in a registry that also has one.
            return
        self.fold()
        with self._lock:
            metrics = [family.collect() for family in self._families]
        yield from metrics
        yield from self._readings()

    def _readings(self) -> Iterator[Metric]:
        """This process's scrape-time readings: internal errors and the added sources."""
        yield _internal_errors_counter(self.multiprocess)
        for source in list(self._sources):
            with _guard.guard("metrics"):
                yield from list(source())

    def flush(self) -> None:
        """Multiprocess mode: copy this process's metrics into its mmap files."""
        writer = self._writer
        if writer is not None:
            with _guard.guard("metrics"):
                self.fold()
                with self._lock:
                    metrics = [family.collect() for family in self._families]
                metrics.extend(self._readings())
                writer.write(metrics)


def _internal_errors_counter(multiprocess: bool = False) -> Metric:
    """The errors so far; in multiprocess mode `component="multiprocess"` from the start, so
    that its series has its space in the files before the disk can fill up."""
    counter = CounterMetricFamily(
        "perfmw_internal_errors",
        "perfmw's own errors, swallowed so that the application goes on.",
        labels=("component",),
    )
    counts = dict(_guard.error_counts)
    if multiprocess:
        counts.setdefault(multiprocess_files.COMPONENT, 0)
    for component, n in sorted(counts.items()):
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
    """The registry's exposition, OpenMetrics when the scraper asks for it.

    In multiprocess mode: every worker's metrics summed from the mmap files (including the
    application's own prometheus-client metrics), whichever worker answers; ScrapeError when
    the directory is gone.
    """
    encoder, content_type = choose_encoder(accept or "")
    if multiprocess_enabled():
        _flusher.ensure_running()
        for sink in live_sinks():
            sink.flush()
        return encoder(_multiprocess_registry()), content_type
    return encoder(registry), content_type


# Multiprocess mode.


def _multiprocess_check() -> bool:
    """Whether prometheus-client writes mmap files; loud when the setup cannot work."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return False
    if not multiprocess_enabled():
        raise ValueError(
            "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported, so its "
            "metrics stay in this process: set it in the environment before the server starts"
        )
    if not os.path.isdir(directory):
        raise ValueError(
            f"PROMETHEUS_MULTIPROC_DIR={directory!r} is not a directory: create it (empty) "
            "before the workers start"
        )
    multiprocess_files.install()
    _flusher.ensure_running()
    return True


_mp_registries: dict[str, CollectorRegistry] = {}


def _multiprocess_registry() -> CollectorRegistry:
    directory = multiprocess_files.readable_directory()
    registry = _mp_registries.get(directory)
    if registry is None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        _mp_registries[directory] = registry
    return registry


class _MmapWriter:
    """Copies metric families of this process into its mmap files, as absolute values.

    Counters are written as this process's total (MultiProcessCollector sums the processes),
    gauges with their mode of GAUGE_MODES, histograms per bucket. Unchanged values are not
    rewritten. A gauge sample that a source stopped reporting (a cache that was dropped) is set
    to 0 so that sums forget it.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._values: dict[tuple[str, ...], Any] = {}
        self._written: dict[tuple[str, ...], float] = {}
        self._gauges: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def write(self, metrics: Iterable[Metric]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # forked: this process has files of its own
                self._pid = os.getpid()
                self._values.clear()
                self._written.clear()
            gauges: set[tuple[str, ...]] = set()
            for metric in metrics:
                for name, labels, value in _absolute_samples(metric):
                    typ = metric.type if metric.type in ("counter", "histogram") else "gauge"
                    mode = GAUGE_MODES.get(metric.name, "livesum") if typ == "gauge" else ""
                    key: tuple[str, ...] = (typ, mode, metric.name, name, repr(labels))
                    holder = self._values.get(key)
                    if holder is None:
                        holder = self._values[key] = _values.ValueClass(
                            typ,
                            metric.name,
                            name,
                            tuple(labels),
                            tuple(labels.values()),
                            metric.documentation,
                            multiprocess_mode=mode,
                        )
                    if self._written.get(key) != value:
                        holder.set(value)
                        self._written[key] = value
                    if typ == "gauge":
                        gauges.add(key)
            for key in self._gauges - gauges:
                self._values[key].set(0.0)
                self._written[key] = 0.0
            self._gauges = gauges


def _absolute_samples(metric: Metric) -> Iterator[tuple[str, dict[str, str], float]]:
    """The samples to store for one family: histogram buckets de-accumulated, no _created."""
    if metric.type != "histogram":
        for sample in metric.samples:
            if not sample.name.endswith("_created"):
                yield sample.name, sample.labels, sample.value
        return
    previous: dict[tuple[tuple[str, str], ...], float] = {}
    buckets = sorted(
        (s for s in metric.samples if s.name.endswith("_bucket")),
        key=lambda s: float(s.labels["le"]),
    )
    for sample in buckets:
        series = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        below = previous.get(series, 0.0)
        previous[series] = sample.value
        yield sample.name, sample.labels, sample.value - below
    for sample in metric.samples:
        if sample.name.endswith("_sum"):
            yield sample.name, sample.labels, sample.value


class _Flusher:
    """One daemon thread per process copying every multiprocess sink's metrics to its files.

    Started lazily and again after a fork (a gunicorn master that preloads the app forks
    workers without its threads). The process's live gauges are dropped at a clean exit; a
    worker killed outright needs the server's hook (gunicorn `child_exit`, docs/production.md).
    """

    def __init__(self) -> None:
        self._pid = 0
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid
            atexit.register(_mark_dead, pid)
            thread = threading.Thread(target=self._run, name="perfmw-multiprocess", daemon=True)
            thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(FLUSH_SECONDS)
            for sink in live_sinks():
                sink.flush()
            shared_findings.write_all()


def _mark_dead(pid: int) -> None:
    """At a clean exit: the last counts to the files, then forget this process's live gauges."""
    if os.getpid() == pid and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        for sink in live_sinks():
            sink.flush()
        shared_findings.write_all()
        with _guard.guard("metrics"):
            mark_process_dead(pid)  # type: ignore[no-untyped-call]


_flusher = _Flusher()
