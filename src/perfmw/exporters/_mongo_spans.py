"""MongoDB commands as CLIENT child spans of the request's span, made by perfmw's own listener.

One command listener per process (`instrument_pymongo()`, once a tracer provider is known)
starts a span when pymongo sends a command and ends it at the reply. The span goes to the
tracer of the app serving the request (several apps with their own providers can share the
process), under the request's span: perfmw's records reach the threads (motor,
run_in_threadpool) that OpenTelemetry's context does not. Attributes follow the stable
database conventions (and the old ones too with `OTEL_SEMCONV_STABILITY_OPT_IN=database/dup`);
the statement is the command's shape (values as `?`) unless the app's `capture_statement` is
on. The driver's housekeeping commands get no span, and when the user instrumented pymongo with
opentelemetry-instrumentation-pymongo themselves, their set-up makes the spans, not perfmw.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from pymongo import monitoring

from .. import _guard, mongo
from ..mongo import HOUSEKEEPING
from ..record import _current
from ..shapes import shape_of
from .tracing import _NAME, _SPAN_KEY, _get_current, _set_attributes

_TRACING = _guard.guard("tracing")
_MONGO = _guard.guard("tracing-mongo")
_CLIENT = SpanKind.CLIENT

STABLE, DUP = "database", "database/dup"


def semconv_mode(environ: Mapping[str, str] = os.environ) -> str:
    """Which database conventions the spans follow, from `OTEL_SEMCONV_STABILITY_OPT_IN` read as
    opentelemetry-instrumentation reads it (comma-separated, `database/dup` wins over
    `database`). Without either, perfmw's default: the stable names only."""
    values = {
        value.strip() for value in environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")
    }
    return DUP if DUP in values else STABLE


#: Spans of commands sent and not answered yet, by (request id, connection). Replies that never
#: come (a connection that died) would keep theirs: past the cap the oldest is dropped unended.
MAX_OPEN_SPANS = 10_000
# The key OpenTelemetry's instrumentations set to make no spans (`suppress_instrumentation`).
_SUPPRESS = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", None)


class SpanListener(monitoring.CommandListener):
    """Starts a CLIENT span per application command and ends it with the reply."""

    def __init__(self, mode: str, contrib: Any = None) -> None:
        self.mode = mode  # read once per process, as the contrib instrumentations do
        self._contrib = contrib  # opentelemetry-instrumentation-pymongo's instrumentor, if any
        self._global = otel_trace.get_tracer(_NAME)  # outside requests: the global provider
        self._open: dict[tuple[int, Any], otel_trace.Span] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name in HOUSEKEEPING:
            return  # the driver's own (endSessions, killCursors): no query of the app's
        with _MONGO:
            contrib = self._contrib
            if contrib is not None and contrib.is_instrumented_by_opentelemetry:
                return  # the user's own pymongo instrumentation makes the spans
            current = _get_current()
            if _SUPPRESS is not None and current.get(_SUPPRESS):
                return
            record = _current.get()
            request_span = record.span if record is not None else None
            if request_span is None:  # outside a traced request: the current context
                tracer, parent = self._global, current
            elif not request_span.recording:
                return  # a dropped request: its commands are dropped with it
            else:
                perf = record.owner  # type: ignore[union-attr]
                tracing = perf.tracing if perf is not None else None
                tracer = tracing.tracer if tracing is not None else self._global
                span = request_span.span
                trace_id = span.get_span_context().trace_id
                inner = otel_trace.get_current_span(current)
                if inner.get_span_context().trace_id == trace_id:
                    parent = current  # a span the app opened inside the request
                else:
                    parent = otel_context.Context({_SPAN_KEY: span})
            database = event.database_name
            span = tracer.start_span(f"{database}.{name}", parent, _CLIENT)
            if not span.is_recording():
                return
            _set_attributes(span, self._attributes(event, record))
            spans = self._open
            spans[(event.request_id, event.connection_id)] = span
            if len(spans) > MAX_OPEN_SPANS:
                spans.pop(next(iter(spans)), None)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        span = self._open.pop((event.request_id, event.connection_id), None)
        if span is not None:
            with _MONGO:
                span.end()

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        span = self._open.pop((event.request_id, event.connection_id), None)
        if span is None:
            return
        with _MONGO:
            failure = event.failure if isinstance(event.failure, Mapping) else {}
            error = failure.get("codeName") or failure.get("errtype") or "_OTHER"
            span.set_attribute("error.type", str(error))
            message = failure.get("errmsg")
            span.set_status(Status(StatusCode.ERROR, str(message) if message else None))
            span.end()

    def _attributes(self, event: monitoring.CommandStartedEvent, record: Any) -> dict[str, Any]:
        """The command's attributes: the statement is its shape (values as `?`), with the
        values only when the app's `capture_statement` is on."""
        name = event.command_name
        command = event.command
        database = event.database_name
        perf = record.owner if record is not None else None
        capture = perf is not None and perf.settings.capture_statement
        statement = None
        if not capture and name != "getMore":  # perfmw's listener has just made the shape
            pending = mongo._inflight.get((event.request_id, event.connection_id))
            if pending is not None and pending[1] is not None:
                statement = pending[1].shape
        if statement is None:
            statement = shape_of(name, command, capture, database)
        target = command.get("collection" if name == "getMore" else name)
        collection = target if isinstance(target, str) else None
        address: Any = event.connection_id  # (host, port)
        attributes: dict[str, AttributeValue] = {
            "db.system.name": "mongodb",
            "db.namespace": database,
            "db.operation.name": name,
            "db.query.text": statement,
        }
        if collection:
            attributes["db.collection.name"] = collection
        if address is not None:
            attributes["server.address"] = str(address[0])
            attributes["server.port"] = int(address[1])
        if self.mode == DUP:  # the names opentelemetry-instrumentation-pymongo used before
            attributes["db.system"] = "mongodb"
            attributes["db.name"] = database
            attributes["db.statement"] = statement
            if collection:
                attributes["db.mongodb.collection"] = collection
            if address is not None:
                attributes["net.peer.name"] = str(address[0])
                attributes["net.peer.port"] = int(address[1])
        return attributes


def _contrib_instrumentor() -> Any:
    """opentelemetry-instrumentation-pymongo's instrumentor (a singleton), if installed."""
    try:
        from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
    except ImportError:
        return None
    return PymongoInstrumentor()


_lock = threading.Lock()
_listener: SpanListener | None = None


def instrument_pymongo() -> None:
    """Trace MongoDB commands as child spans, once per process (clients created from now on)."""
    global _listener
    if _listener is not None:
        return
    with _lock, _TRACING:
        if _listener is None:
            _listener = SpanListener(semconv_mode(), _contrib_instrumentor())
            monitoring.register(_listener)
