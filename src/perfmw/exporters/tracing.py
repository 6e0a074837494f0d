"""OpenTelemetry sink: one SERVER span per request carrying perfmw's measurements.

The middleware calls `Tracing.start()` when a request begins and `detach()` with its token
when its call returns; `Perf.finish()` calls `end()` with the finished record, which names
the span after the route, sets perfmw's attributes, turns findings into span events and ends
the span.
MongoDB commands become CLIENT child spans through perfmw's own command listener
(`_mongo_spans.py`), turned on with the first tracer.

No span is made per body chunk: the one span covers the request up to its last chunk.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import weakref
from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk import trace as otel_sdk_trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from .. import _guard
from ..record import OTHER, UNMATCHED, RequestRecord
from ._lean_span import LeanSpan, LeanSpans
from ._sampling import (
    RANDOM_TRACE_ID,
    TRACE_ID_LIMIT,
    W3C_HEADERS,
    PresetIds,
    UnsampledSpan,
    random_trace_ids,
    ratio_sampling,
    sampled_parent,
    unsampled_parent,
    w3c_only,
)

if TYPE_CHECKING:
    from ..findings import Finding
    from ..perf import Perf

_TRACING = _guard.guard("tracing")
_NAME = "perfmw"


class RequestSpan:
    """What `record.span` holds: the request's span, whether perfmw started it, its exemplar."""

    __slots__ = ("exemplar", "owned", "recording", "span")

    def __init__(self, span: otel_trace.Span, owned: bool, recording: bool = True) -> None:
        self.span = span
        self.owned = owned  # False when enriching another instrumentation's server span
        self.recording = recording  # False: a dropped span, nothing to add or end
        # The Prometheus exemplar linking a histogram bucket to this trace (sampled spans only).
        self.exemplar: dict[str, str] | None = None
        if recording:
            context = span.get_span_context()
            if context.trace_flags.sampled:
                self.exemplar = {"trace_id": format(context.trace_id, "032x")}


class _HeaderGetter(Getter[Sequence[tuple[bytes, bytes]]]):
    """Reads propagation headers (traceparent, tracestate, baggage...) from ASGI scope headers."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        found = [bytes(v).decode("latin-1") for k, v in carrier if k.lower() == name]
        return found or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [bytes(k).decode("latin-1") for k, _ in carrier]


_GETTER = _HeaderGetter()


def _runtime_context_var() -> contextvars.ContextVar[otel_context.Context] | None:
    """The ContextVar of OpenTelemetry's default runtime context, if that is the one in use."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime).__name__ != "ContextVarsRuntimeContext":
        return None  # another runtime context (OTEL_PYTHON_CONTEXT): through its API
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, contextvars.ContextVar) else None


def _detach_through_api(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]  # logs, never raises


# Reading and setting the current OpenTelemetry context, three times per traced request: on
# the default runtime context, its ContextVar directly (two Python calls less each time).
_var = _runtime_context_var()
_get_current: Callable[[], otel_context.Context]
_attach: Callable[[otel_context.Context], object]
_detach: Callable[[Any], None]
if _var is not None:
    _get_current, _attach, _detach = _var.get, _var.set, _var.reset
else:
    _get_current, _attach, _detach = (
        otel_context.get_current,
        otel_context.attach,
        _detach_through_api,
    )
# What propagate.get_global_textmap() returns is this module global: read directly, a call
# less per request (through the function should a release rename it).
_TEXTMAP_IS_GLOBAL = hasattr(propagate, "_HTTP_TEXT_FORMAT")
# The key OpenTelemetry keeps the current span under, learnt once through its public API, so
# that making a span current is one Context instead of set_span_in_context's chain of calls.
(_SPAN_KEY,) = otel_trace.set_span_in_context(otel_trace.INVALID_SPAN, otel_context.Context())
_SERVER = SpanKind.SERVER
_SDK_SPAN = getattr(otel_sdk_trace, "_Span", otel_sdk_trace.Span)  # what the SDK's tracers make


class Tracing:
    """One Perf's tracing: its tracer, and the request's span started (or adopted) by the SDK.

    With no provider passed to `instrument()`, the global provider is used once one is set
    (`perfmw.configure_tracing()` or `trace.set_tracer_provider()`): at startup, or within a
    second after it (see `on_loop`). Until then `perf.tracing` is None and requests pay nothing.
    """

    __slots__ = ("_provider", "tracer")

    def __init__(self, provider: Any, tracer: otel_trace.Tracer) -> None:
        self._provider = provider  # as passed to instrument(): None for the global one
        self.tracer = tracer

    @property
    def provider(self) -> Any:
        return self._provider if self._provider is not None else otel_trace.get_tracer_provider()

    def start(self, scope: MutableMapping[str, Any], record: RequestRecord) -> object:
        """Open (or adopt) the request's server span and make it current for the app call.

        Returns the token the middleware hands to `detach()` when the app call returns (None
        when no span was made current).
        """
        try:  # perfmw's guard, without a context manager's two calls per request
            current_context = _get_current()
            current = otel_trace.get_current_span(current_context) if current_context else None
            if current is not None and current.get_span_context().is_valid:
                # Another instrumentation (OTel's ASGI middleware outside us) already opened
                # this request's span: enrich it rather than starting a second server span.
                if current.is_recording() and getattr(current, "kind", None) is _SERVER:
                    record.span = RequestSpan(current, owned=False)
                    return None
                if not current.is_recording():
                    return None  # an unsampled parent in this process: nothing to record
                parent: otel_context.Context | None = current_context
            else:
                headers = scope.get("headers")
                parent = propagate.extract(headers, getter=_GETTER) if headers else None
            span = self.tracer.start_span(record.method, parent, _SERVER)
            return self._own(span, parent, scope, record)
        except Exception as exc:
            _guard.report_internal_error("tracing", exc)
            return None

    @staticmethod
    def _own(
        span: otel_trace.Span,
        parent: otel_context.Context | None,
        scope: MutableMapping[str, Any],
        record: RequestRecord,
    ) -> object:
        """The SDK's new span becomes the request's: its attributes, `record.span`, current."""
        recording = span.is_recording()
        if recording:
            _set_attributes(span, _start_attributes(scope, record))
        record.span = RequestSpan(span, True, recording)
        return _attach(
            otel_context.Context({**parent, _SPAN_KEY: span} if parent else {_SPAN_KEY: span})
        )


class RatioTracing(Tracing):
    """Tracing for a provider sampling with ParentBased(TraceIdRatioBased), as most do, or the
    SDK's default ParentBased(ALWAYS_ON) (the ratio 1: no header extraction for new roots).

    A request with no span current and only W3C propagation headers is decided here from its
    trace id alone (`_sampling.py`): a new root's random id against the ratio's bound, or a
    remote parent's flags. Dropped requests get an `UnsampledSpan` and never reach the SDK;
    sampled ones go through it with the id decided on. Anything else is `Tracing.start`'s.
    """

    __slots__ = ("_bound", "_ids", "_lean", "_random_bits", "_random_flag", "_textmap")

    def __init__(self, provider: Any, tracer: otel_trace.Tracer, ids: PresetIds, bound: int):
        super().__init__(provider, tracer)
        self._ids = ids
        self._bound = bound
        self._random_flag = RANDOM_TRACE_ID if ids.is_trace_id_random() else 0
        self._random_bits = random_trace_ids(ids)
        self._textmap: Any = None  # the global propagator, once known to be W3C only
        # configure_tracing()'s provider: sampled roots are perfmw's own spans (_lean_span.py)
        self._lean = LeanSpans.for_tracer(tracer, ids)

    def start(self, scope: MutableMapping[str, Any], record: RequestRecord) -> object:
        # One frame per request, on purpose: each Python call here costs about 0.3 µs.
        try:
            textmap = (
                propagate._HTTP_TEXT_FORMAT
                if _TEXTMAP_IS_GLOBAL
                else propagate.get_global_textmap()
            )
            if _get_current() or (textmap is not self._textmap and not self._adopt(textmap)):
                return Tracing.start(self, scope, record)  # a span or baggage already current
            traceparent = None
            tracestate: list[str] | None = None
            for key, value in scope.get("headers") or ():
                if key in W3C_HEADERS:
                    if key == b"traceparent":
                        traceparent = value
                    elif key == b"baggage":
                        return Tracing.start(self, scope, record)
                    else:
                        tracestate = [*(tracestate or ()), bytes(value).decode("latin-1")]
            span: UnsampledSpan
            if traceparent is not None:
                if unsampled_parent(traceparent) is None:
                    lean = self._lean
                    parent = sampled_parent(traceparent) if lean is not None else None
                    if lean is None or parent is None or not lean.usable():
                        return Tracing.start(self, scope, record)  # for the SDK to read
                    continued = lean.continued(record.method, parent, tracestate)
                    return self._own(continued, None, scope, record)
                span = UnsampledSpan(traceparent, 0, tracestate, self._ids)
            else:
                random_bits = self._random_bits
                trace_id = (
                    (random_bits(128) or 1) if random_bits else self._ids.inner.generate_trace_id()
                )
                if trace_id & TRACE_ID_LIMIT < self._bound:
                    lean = self._lean
                    sampled: otel_trace.Span
                    if lean is not None and lean.usable():
                        sampled = lean.start(record.method, trace_id, self._random_flag)
                    else:
                        self._ids.local.trace_id = trace_id  # the SDK's span gets this id
                        sampled = self.tracer.start_span(record.method, None, _SERVER)
                    return self._own(sampled, None, scope, record)
                span = UnsampledSpan(trace_id, self._random_flag, None, self._ids)
            record.span = span
            return _attach(otel_context.Context({_SPAN_KEY: span}))
        except Exception as exc:
            _guard.report_internal_error("tracing", exc)
            return None

    def _adopt(self, textmap: Any) -> bool:
        """Whether the fast path reads this propagator's headers (W3C only); remembered."""
        if w3c_only(textmap):
            self._textmap = textmap
            return True
        return False


def _tracing_for(provider: Any) -> Tracing | None:
    """The tracing for `instrument()`'s provider (None: the global one); None while no real
    provider exists."""
    resolved = provider
    if resolved is None:
        if otel_trace._TRACER_PROVIDER is None:  # nothing set yet: stay a no-op
            return None
        resolved = otel_trace.get_tracer_provider()
    if isinstance(resolved, (otel_trace.ProxyTracerProvider, otel_trace.NoOpTracerProvider)):
        return None
    from ._mongo_spans import instrument_pymongo  # it builds on this module

    tracer: otel_trace.Tracer = resolved.get_tracer(_NAME)
    instrument_pymongo()
    ratio = ratio_sampling(resolved, tracer)
    if ratio is None:
        return Tracing(provider, tracer)
    return RatioTracing(provider, tracer, *ratio)


_EMPTY = otel_context.Context()


def step_out() -> object:
    """Make no span current (until `step_in`), whoever attached the current one."""
    return _attach(_EMPTY)


def step_in(token: object) -> None:
    """Undo `step_out()`."""
    try:
        _detach(token)
    except (ValueError, RuntimeError) as exc:  # a token from another context: never raise
        _guard.report_internal_error("tracing", exc)


#: The app call returned: `detach(token)` with `Tracing.start()`'s token makes the request's
#: span stop being the current one. One C call on the default runtime context; it raises
#: ValueError or RuntimeError for a token from another context (the caller reports those).
detach: Callable[[Any], None] = _detach


def end(record: RequestRecord) -> None:
    """Name the span after the route, add perfmw's attributes and events, and end it."""
    request_span: RequestSpan = record.span
    if not request_span.recording:
        return
    span = request_span.span
    with _TRACING:
        if span.is_recording():
            _end_attributes(span, record)
        if request_span.owned:
            span.end()


def for_perf(perf: Perf) -> Tracing | None:
    """The Perf's tracing once it has a tracer; None when `settings.trace` is off or until a
    provider exists (`on_loop` keeps looking for one)."""
    provider = perf.tracer_provider
    if provider is not None and not callable(getattr(provider, "get_tracer", None)):
        raise ValueError(
            f"tracer_provider must be an OpenTelemetry TracerProvider, got {provider!r}"
        )
    if not perf.settings.trace:
        return None
    tracing = _tracing_for(provider)
    if tracing is None:
        _waiting[perf] = provider
    return tracing


#: Perfs whose tracing waits for a provider (the value: the one `instrument()` was given, None
#: for the global one): the middleware does no tracing work for them.
_waiting: weakref.WeakKeyDictionary[Perf, Any] = weakref.WeakKeyDictionary()
#: How often a waiting Perf looks for a provider again, from its event loop.
RECHECK_SECONDS = 1.0


def on_loop(perf: Perf) -> None:
    """At lifespan startup (or the first request): take a global provider set since
    `instrument()`, so that pymongo is instrumented before the app's lifespan creates its
    clients (existing clients are not). With none yet, look again every second."""
    if perf not in _waiting:
        return
    with _TRACING:
        _recheck(weakref.ref(perf), asyncio.get_running_loop())


def _recheck(perf_ref: weakref.ref[Perf], loop: asyncio.AbstractEventLoop) -> None:
    perf = perf_ref()
    if perf is None or perf.closed or perf not in _waiting:
        return
    with _TRACING:
        tracing = _tracing_for(_waiting[perf])
        if tracing is not None:
            del _waiting[perf]
            perf.tracing = tracing  # requests are traced from the next one on
            return
    loop.call_later(RECHECK_SECONDS, _recheck, perf_ref, loop)


def flush(perf: Perf) -> None:
    """`perf.shutdown()`: send the spans its provider still holds (the provider stays usable)."""
    tracing = perf.tracing
    if tracing is not None:
        force_flush = getattr(tracing.provider, "force_flush", None)
        if force_flush is not None:
            force_flush()


# What the span says.


def _start_attributes(scope: MutableMapping[str, Any], record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": record.method,
        "url.path": record.path,
        "url.scheme": scope.get("scheme", "http"),
    }
    server = scope.get("server")
    if server:
        host, port = server[0], server[1]
        attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
    # client.address and network.protocol.version (recommended, not required) are left out:
    # every traced request would pay for them.
    return attributes


def _end_attributes(span: otel_trace.Span, record: RequestRecord) -> None:
    route = record.route
    routed = route not in (UNMATCHED, OTHER)
    if routed:
        span.update_name(f"{record.method} {route}")
    status = record.status_code or 0
    attributes: dict[str, Any] = {
        "http.response.status_code": status,
        "http.response.body.size": record.response_bytes,
        "perfmw.db.queries": len(record.queries),
        "perfmw.db.duration_ms": record.db_seconds * 1000.0,
        "perfmw.cache.hits": record.cache_hits,
        "perfmw.cache.misses": record.cache_misses,
        "perfmw.loop.stall_ms": record.stall_seconds * 1000.0,
    }
    if routed:
        attributes["http.route"] = route
    if status >= 500:
        exc = sys.exc_info()[1]  # set when the 500 is sent while handling the app's error
        if isinstance(exc, Exception):
            span.record_exception(exc)
            attributes["error.type"] = type(exc).__qualname__
        else:
            attributes["error.type"] = str(status)
        span.set_status(Status(StatusCode.ERROR))
    _set_attributes(span, attributes)
    for finding in record.findings:
        span.add_event(f"perfmw.{finding.kind}", _event_attributes(finding))


def _set_attributes(span: otel_trace.Span, attributes: dict[str, Any]) -> None:
    """perfmw's own attributes on the request's span.

    They are valid by construction (string keys; str, int and float values), so on the SDK's
    span they go straight into its attribute dict: the SDK validates each value under a lock,
    about 0.5 µs apiece, 13 per request. Another span type, an ended span, a value length
    limit or a span near its attribute count limit go through `set_attributes()`.
    """
    if type(span) is LeanSpan:
        span.add_trusted(attributes)
        return
    if type(span) is _SDK_SPAN:
        try:
            bounded = span._attributes
            if (
                span._end_time is None
                and type(bounded) is BoundedAttributes
                and bounded.max_value_len is None
                and (bounded.maxlen is None or len(bounded) + len(attributes) <= bounded.maxlen)
            ):
                bounded._dict.update(attributes)
                return
        except AttributeError:  # an SDK release that keeps them differently
            pass
    span.set_attributes(attributes)


def _event_attributes(finding: Finding) -> Attributes:
    """A finding as span event attributes: its detail's scalars, in seconds as milliseconds."""
    detail = finding.detail
    attributes: dict[str, Any] = {}
    for key, value in detail.items():
        if key == "stack":
            continue
        if key.endswith("_seconds") and isinstance(value, (int, float)):
            attributes[key[: -len("_seconds")] + "_ms"] = value * 1000.0
        elif isinstance(value, (str, bool, int, float)):
            attributes[key] = value
    if finding.kind == "n_plus_one":
        attributes["count"] = detail.get("repetitions", finding.count)
    else:
        attributes.setdefault("count", finding.count)
    attributes.setdefault("duration_ms", finding.total_seconds * 1000.0)
    stack = detail.get("stack")
    if stack:
        attributes["code.stacktrace"] = "\n".join(str(line) for line in stack)
    if finding.location:
        path, _, line = finding.location.rpartition(":")
        if line.isdigit():
            attributes["code.filepath"] = path
            attributes["code.lineno"] = int(line)
    return attributes
