"""`Perf`: one instrumented application's settings, sinks and findings; `instrument()`; `track()`.

perf = perfmw.instrument(app)           # one line in a FastAPI/Starlette app
with perfmw.track("nightly-job"): ...   # work outside HTTP gets a record too
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from . import _frames, _guard, detectors
from ._contexts import SyncAndAsync
from .exporters import logs, shared_findings
from .exporters import tracing as tracing_sink
from .exporters.prometheus import PrometheusSink, sink_for
from .findings import Finding, FindingsStore
from .record import RequestRecord, _current
from .routes import RouteLabels
from .settings import Settings

logger = logging.getLogger("perfmw")
_FINISH = _guard.guard("finish")
_STATE_KEY = "_perfmw_perf"

_live: weakref.WeakSet[Perf] = weakref.WeakSet()
_live_lock = threading.Lock()


def live_perfs() -> list[Perf]:
    """Every Perf not shut down, oldest first."""
    with _live_lock:
        return sorted(_live, key=lambda perf: perf.created)


class Perf:
    """The handle `instrument()` returns: settings, sinks, findings and lifecycle of one app."""

    def __init__(
        self,
        settings: Settings | None = None,
        registry: CollectorRegistry | None = None,
        tracer_provider: Any = None,
        app: Any = None,
    ) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise ValueError(f"settings must be a perfmw.Settings, got {type(settings).__name__}")
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise ValueError(
                f"registry must be a prometheus_client CollectorRegistry, got {registry!r}"
            )
        # No settings given: the deployment's PERFMW_* variables (all defaults without any).
        self.settings = settings if settings is not None else Settings.from_env()
        self.registry = registry if registry is not None else REGISTRY
        self.tracer_provider = tracer_provider
        self.app = app
        self.created = time.monotonic()
        self.sink: PrometheusSink = sink_for(self.registry)
        self.findings = FindingsStore(self.settings.max_findings)
        self.routes = RouteLabels(self.settings.max_routes, app)
        _frames.count_as_library(self.settings.library_paths)
        from .endpoints import build_endpoints

        # The paths of perfmw's own endpoints: what happens while one runs is counted on its
        # path, never a finding about the application.
        self.own_routes = frozenset(build_endpoints(self))
        # None when settings.trace is off: the middleware's only tracing cost is this check.
        self.tracing = tracing_sink.for_perf(self)
        self.loop_started = False
        self._loops: list[Any] = []  # loop monitors this Perf started (see loop.py)
        self.closed = False
        with _live_lock:
            _live.add(self)
        if self.sink.multiprocess:
            shared_findings.join(self)  # its findings answer for every worker

    # Lifecycle

    def on_loop(self) -> None:
        """Called from the running loop at lifespan startup or the first request."""
        self.loop_started = True
        with _guard.guard("loop"):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            for hook in _loop_hooks:
                hook(self)

    def shutdown(self) -> None:
        """Stop the loop monitors and flush the exporters. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        with _live_lock:
            _live.discard(self)
        for hook in _shutdown_hooks:
            with _guard.guard("shutdown"):
                hook(self)
        self.flush()

    # Finishing records: detectors, then sinks.

    def finish(self, record: RequestRecord) -> None:
        """Run the detectors over a finished record and hand it to every sink.

        The middleware hands most requests (nothing for a detector or a hook to look at)
        straight to the Prometheus sink instead, and their spans straight to the tracer.
        """
        record.closed = True
        with _FINISH:
            if record.stalls:
                # A loop stall still open when its record finishes is settled first (loop/).
                for hook in _stall_hooks:
                    hook(record)
            if record.queries:
                for hook in _query_hooks:  # the time each query waited behind a loop stall
                    hook(record)
            own = record.route in self.own_routes  # perfmw's endpoint, not the app's code
            found = [] if own else detectors.detect(record, self.settings)
            if found:
                self.add_findings(found, record)
            if record.findings or record.stalls or record.blocking_calls:
                self.sink.observe_record(record)
            if record.span is not None:
                tracing_sink.end(record)
            for hook in _finish_hooks:
                hook(self, record)

    def add_findings(self, found: list[Finding], record: RequestRecord | None) -> None:
        """New findings (of `record`, if still known): stored, counted, logged."""
        if record is not None:
            record.findings.extend(found)
        for finding in found:
            self.findings.add(finding)
        span = None if record is None else record.span
        self.sink.observe_findings(
            found, None if span is None else span.exemplar, self.settings.max_findings
        )
        logs.log_findings(found)

    def flush(self) -> None:
        """Multiprocess mode: this worker's last counts and findings to its files."""
        self.sink.flush()
        shared_findings.write(self)


# Hooks the optional sources and sinks (loop monitor, tracing) register at import time, so this
# module needs no knowledge of them.
_loop_hooks: list[Any] = []
_shutdown_hooks: list[Any] = []
_finish_hooks: list[Any] = []
_stall_hooks: list[Any] = []  # called with a finishing record that has stalls, before detectors
_query_hooks: list[Any] = []  # called with a finishing record that has queries, before detectors
_loop_hooks.append(tracing_sink.on_loop)  # a provider set since instrument() is taken at startup
_shutdown_hooks.append(tracing_sink.flush)  # spans still queued are sent


def instrument(
    app: Any,
    settings: Settings | None = None,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any = None,
) -> Perf:
    """Add perfmw to a Starlette or FastAPI app, outermost; returns its `Perf` (idempotent)."""
    existing = getattr(app, _STATE_KEY, None)
    if isinstance(existing, Perf) and not existing.closed:
        return existing
    if not hasattr(app, "build_middleware_stack"):
        raise ValueError(
            "perfmw.instrument() takes a Starlette or FastAPI application; wrap any other ASGI "
            "app with perfmw.PerfMiddleware(app) instead"
        )
    from .middleware import PerfMiddleware

    perf = Perf(settings, registry, tracer_provider, app=app)
    _frames.claim_application(sys._getframe(1))  # an app installed in site-packages is the app
    build = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        # Outside Starlette's ServerErrorMiddleware, so even its 500 responses are measured.
        stack = build()
        if perf.tracing is not None:
            stack = _without_fastapi_instrumentor(stack)
        return PerfMiddleware(stack, perf=perf)

    app.build_middleware_stack = build_middleware_stack
    app.middleware_stack = None  # rebuilt with perfmw at the next call
    setattr(app, _STATE_KEY, perf)
    from . import mongo

    mongo.register_listeners()
    return perf


def _without_fastapi_instrumentor(stack: Any) -> Any:
    """The stack without the server span FastAPIInstrumentor.instrument_app() put in it:
    perfmw's span is the request's server span, and OpenTelemetry's would be a second one, with
    its own send spans. Its releases since 0.55b0 wrap the whole stack (a bare
    ServerErrorMiddleware > OpenTelemetryMiddleware > the app's own stack, which starts with its
    ServerErrorMiddleware); earlier ones add the middleware first among the app's, with
    FastAPI's span details. An
    OpenTelemetryMiddleware the app lists itself stays (its span becomes a child of perfmw's)."""
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from starlette.middleware.errors import ServerErrorMiddleware
    except ImportError:
        return stack
    if type(stack) is not ServerErrorMiddleware or type(stack.app) is not OpenTelemetryMiddleware:
        return stack
    otel = stack.app
    if type(otel.app) is ServerErrorMiddleware:
        stack = otel.app
    elif getattr(otel.default_span_details, "__module__", "").startswith(
        "opentelemetry.instrumentation.fastapi"
    ):
        stack.app = otel.app  # the stack was built for perfmw: nothing else holds it
    else:
        return stack
    logger.info(
        "perfmw: FastAPIInstrumentor's span left out, perfmw's is the request's server span"
    )
    return stack


class track(SyncAndAsync[RequestRecord]):
    """Open a record for work outside HTTP (jobs, startup, background tasks).

    with perfmw.track("nightly-job") as record: ...
    async with perfmw.track("refresh-cache") as record: ...
    """

    __slots__ = ("_record", "_token", "name")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"perfmw.track() needs a non-empty name, got {name!r}")
        self.name = name

    def __enter__(self) -> RequestRecord:
        perfs = live_perfs()
        self._record = RequestRecord(self.name, "", "", "track", perfs[0] if perfs else None)
        self._token = _current.set(self._record)
        return self._record

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        record = self._record
        record.duration_seconds = time.perf_counter() - record.started_at
        _current.reset(self._token)
        owner = record.owner
        if isinstance(owner, Perf):
            owner.finish(record)
        else:
            record.closed = True
