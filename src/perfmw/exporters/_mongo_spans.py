"""MongoDB commands as CLIENT child spans of the request's span.

opentelemetry-instrumentation-pymongo registers one command listener per process, with one
tracer. perfmw gives it a tracer that picks, per command, the tracer of the provider of the app
serving the request (`_RoutingTracer`), and hooks that set the span's attributes themselves, in
the stable database conventions (and the old ones too with `OTEL_SEMCONV_STABILITY_OPT_IN=
database/dup`): the instrumentation's own attributes depend on its release (0.46b0 knows only
the old names) and put the bare command name in `db.query.text`, so `_CommandSpan` leaves them
out. The statement is the command's shape (values as `?`) unless the app's `capture_statement`
is on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import Attributes, AttributeValue
from wrapt import ObjectProxy

from .. import _guard
from ..mongo import HOUSEKEEPING
from ..record import _current

if TYPE_CHECKING:
    from .tracing import RequestSpan

_TRACING = _guard.guard("tracing")
_MONGO = _guard.guard("tracing-mongo")


class _RoutingTracer:
    """pymongo's tracer: starts each command's span with the tracer of the request's app.

    opentelemetry-instrumentation-pymongo registers one listener per process with one tracer;
    several apps (with their own providers) can share the process, so the choice is made per
    command from the current perfmw record. Outside a traced request the global provider is
    used; the driver's housekeeping commands get no span, as they are no query of the app's. The
    parent is the current span when it belongs to the request's trace (a span the
    app opened itself), otherwise the request's span: records reach threads (motor,
    run_in_threadpool) that OpenTelemetry's context did not.
    """

    def __init__(self) -> None:
        self._global = otel_trace.get_tracer("opentelemetry.instrumentation.pymongo")
        self._tracers: dict[int, tuple[Any, otel_trace.Tracer]] = {}
        self._lock = threading.Lock()

    def _tracer_for(self, provider: Any) -> otel_trace.Tracer:
        entry = self._tracers.get(id(provider))
        if entry is None or entry[0] is not provider:
            with self._lock:
                if len(self._tracers) > 64:
                    self._tracers.clear()
                entry = (provider, provider.get_tracer("opentelemetry.instrumentation.pymongo"))
                self._tracers[id(provider)] = entry
        return entry[1]

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> otel_trace.Span:
        if name.rpartition(".")[2] in HOUSEKEEPING:  # "<database>.<command>"
            return otel_trace.INVALID_SPAN  # the driver's own (endSessions, killCursors): no span
        tracer = self._global
        record = _current.get()
        request_span: RequestSpan | None = record.span if record is not None else None
        if request_span is not None:
            with _MONGO:
                perf = record.owner  # type: ignore[union-attr]
                tracing = perf.tracing if perf is not None else None
                if tracing is not None:
                    tracer = self._tracer_for(tracing.provider)
                parent = request_span.span.get_span_context()
                if context is None and (
                    otel_trace.get_current_span().get_span_context().trace_id != parent.trace_id
                ):
                    context = otel_trace.set_span_in_context(request_span.span)
        span = tracer.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        return _CommandSpan(span) if span.is_recording() else span  # type: ignore[return-value]


class _CommandSpan(ObjectProxy):  # type: ignore[misc,type-arg,unused-ignore]
    """A command's span as pymongo's instrumentation holds it: the attributes it sets are left
    out (perfmw's hooks set theirs on the span itself); its status and end pass through."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        return None


class _RoutingTracerProvider:
    """What `get_tracer()` of pymongo's instrumentation is given: always the routing tracer."""

    def __init__(self) -> None:
        self._tracer = _RoutingTracer()

    def get_tracer(self, *args: Any, **kwargs: Any) -> _RoutingTracer:
        return self._tracer


STABLE, DUP = "database", "database/dup"


def semconv_mode(environ: Mapping[str, str] = os.environ) -> str:
    """Which database conventions the spans follow, from `OTEL_SEMCONV_STABILITY_OPT_IN` read as
    opentelemetry-instrumentation reads it (comma-separated, `database/dup` wins over
    `database`). Without either, perfmw's default: the stable names only."""
    values = {
        value.strip() for value in environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")
    }
    return DUP if DUP in values else STABLE


_mode = STABLE  # read once per process, when pymongo is instrumented (as the contrib does)


def _started_hook(span: otel_trace.Span, event: Any) -> None:
    """The command's attributes: the statement is its shape (values as `?`), with the values
    only when the app's `capture_statement` is on."""
    if not span.is_recording():
        return
    with _MONGO:
        from ..shapes import shape_of
        from .tracing import _set_attributes

        record = _current.get()
        perf = record.owner if record is not None else None
        capture = perf is not None and perf.settings.capture_statement
        name = event.command_name
        command = event.command
        statement = shape_of(name, command, capture, event.database_name)
        target = command.get("collection" if name == "getMore" else name)
        collection = target if isinstance(target, str) else None
        address: tuple[str, int] | None = event.connection_id
        attributes: dict[str, AttributeValue] = {
            "db.system.name": "mongodb",
            "db.namespace": event.database_name,
            "db.operation.name": name,
            "db.query.text": statement,
        }
        if collection:
            attributes["db.collection.name"] = collection
        if address is not None:
            attributes["server.address"] = str(address[0])
            attributes["server.port"] = int(address[1])
        if _mode == DUP:  # the names opentelemetry-instrumentation-pymongo used before
            attributes["db.system"] = "mongodb"
            attributes["db.name"] = event.database_name
            attributes["db.statement"] = statement
            if collection:
                attributes["db.mongodb.collection"] = collection
            if address is not None:
                attributes["net.peer.name"] = str(address[0])
                attributes["net.peer.port"] = int(address[1])
        _set_attributes(getattr(span, "__wrapped__", span), attributes)  # valid by construction


def _failed_hook(span: otel_trace.Span, event: Any) -> None:
    """`error.type`: the server's error code name, else the driver's exception class."""
    if not span.is_recording():
        return
    with _MONGO:
        failure = event.failure if isinstance(event.failure, Mapping) else {}
        error = failure.get("codeName") or failure.get("errtype") or "_OTHER"
        getattr(span, "__wrapped__", span).set_attribute("error.type", str(error))


_pymongo_lock = threading.Lock()
_pymongo_instrumented = False


def instrument_pymongo() -> None:
    """Trace MongoDB commands as child spans, once per process, unless the user already did."""
    global _pymongo_instrumented, _mode
    if _pymongo_instrumented:
        return
    with _pymongo_lock, _TRACING:
        if _pymongo_instrumented:
            return
        _pymongo_instrumented = True
        _mode = semconv_mode()
        from opentelemetry.instrumentation.pymongo import PymongoInstrumentor

        instrumentor = PymongoInstrumentor()
        if instrumentor.is_instrumented_by_opentelemetry:
            return  # the user's own set-up (their provider, hooks) wins
        instrumentor.instrument(
            tracer_provider=_RoutingTracerProvider(),
            request_hook=_started_hook,
            failed_hook=_failed_hook,
            capture_statement=False,
        )
