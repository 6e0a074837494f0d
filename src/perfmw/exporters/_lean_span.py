"""A request's server span made by perfmw itself, for the provider `configure_tracing()` built.

The SDK's `Tracer.start_span` asks the sampler again, reads the context, builds its Span with a
lock, bounded containers and a readable copy at the end, and calls every processor: about a
third of what tracing adds to a request. When the provider's only processor is perfmw's own
(`LoopFriendlySpanProcessor`, which reads a span's fields and encodes them) and perfmw's
sampling has already decided, none of that does anything the export needs: `LeanSpan` is the
span with only its fields, handed to that processor when it ends. It is a full span to the
application (`trace.get_current_span()` in a handler: attributes, events, status, exceptions,
children), within the provider's limits. Any other set-up (another processor added, even later;
a value length limit; a tracer disabled by configuration) gets the SDK's span.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace as otel_trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util import types

from ._sampling import CONTEXT_IS_TUPLE, RANDOM_TRACE_ID, random_trace_ids

_UNSET = Status(StatusCode.UNSET)
_time_ns = time.time_ns
_new_tuple = tuple.__new__
_ID_LIMITS = (1 << 128, 1 << 64)  # trace and span ids are below these


class LeanSpan(otel_trace.Span, ReadableSpan):
    """A recording span whose fields are what `ReadableSpan` and perfmw's encoder read."""

    def __init__(self, name: str, context: SpanContext, kind: SpanKind, factory: LeanSpans) -> None:
        # ReadableSpan's fields, set here rather than through its __init__ (a call less).
        self._name = name
        self._context = context
        self._kind = kind
        self._parent: SpanContext | None = None
        self._start_time: int | None = _time_ns()
        self._end_time: int | None = None
        self._attributes: Any = {}  # a dict until the application sets one (then bounded)
        self._events: Any = ()
        self._links: Any = ()
        self._status = _UNSET
        self._resource = factory.resource
        self._instrumentation_scope = factory.scope
        self._instrumentation_info = factory.info
        self._factory = factory

    # perfmw's own attributes: valid by construction, within the count limit or bounded.

    def add_trusted(self, attributes: dict[str, Any]) -> None:
        if self._end_time is not None:
            return
        current = self._attributes
        if type(current) is dict and len(current) + len(attributes) <= self._factory.max_attributes:
            current.update(attributes)
        else:
            self.set_attributes(attributes)

    # The Span API, for the application.

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # set once, never None here

    def is_recording(self) -> bool:
        return self._end_time is None

    def _bounded(self) -> BoundedAttributes:
        current = self._attributes
        if type(current) is not BoundedAttributes:
            current = self._attributes = BoundedAttributes(
                self._factory.max_attributes, current, immutable=False
            )
        return current

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end_time is not None:
            return
        bounded = self._bounded()
        for key, value in attributes.items():
            bounded[key] = value

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end_time is None:
            self._bounded()[key] = value

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            return
        limits = self._factory.limits
        if type(self._events) is tuple:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length
        )
        self._events.append(Event(name, bounded, timestamp or _time_ns()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is not None or context is None or not context.is_valid:
            return
        limits = self._factory.limits
        if type(self._links) is tuple:
            self._links = BoundedList(limits.max_links)
        bounded = BoundedAttributes(
            limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length
        )
        self._links.append(Link(context, bounded))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return  # OK is final, as in the SDK
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        import traceback

        kind = type(exception)
        module, qualname = kind.__module__, kind.__qualname__
        event: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(
                traceback.format_exception(kind, exception, exception.__traceback__)
            ),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time or _time_ns()
        self._factory.processor.on_end(self)


class LeanSpans:
    """Makes `LeanSpan`s for one tracer while its provider's only processor is perfmw's."""

    __slots__ = (
        "_enabled",
        "_ids",
        "_multi",
        "_processors",
        "_random_flags",
        "_span_ids",
        "info",
        "limits",
        "max_attributes",
        "processor",
        "resource",
        "scope",
    )

    def __init__(self, tracer: Any, processors: Sequence[Any], ids: Any) -> None:
        self.processor = processors[0]
        self._multi = tracer.span_processor
        self._processors = processors  # the SDK replaces the tuple when one is added
        self.limits = tracer._span_limits
        self.max_attributes = self.limits.max_span_attributes
        self.resource = tracer.resource
        self.scope = tracer._instrumentation_scope
        self.info = getattr(tracer, "instrumentation_info", None)
        self._enabled = getattr(tracer, "_is_enabled", None)  # SDKs with tracer configs
        self._ids = ids
        # getrandbits for span ids when the SDK's default generator makes them, as it does.
        self._span_ids = random_trace_ids(ids)
        sampled = TraceFlags.SAMPLED
        self._random_flags = (TraceFlags(sampled), TraceFlags(sampled | RANDOM_TRACE_ID))

    @classmethod
    def for_tracer(cls, tracer: Any, ids: Any) -> LeanSpans | None:
        """The factory, when the tracer's provider exports only through perfmw's processor."""
        processors = getattr(getattr(tracer, "span_processor", None), "_span_processors", None)
        limits = getattr(tracer, "_span_limits", None)
        if (
            type(processors) is not tuple
            or len(processors) != 1
            or not getattr(processors[0], "takes_lean_spans", False)
            or limits is None
            or limits.max_span_attribute_length is not None
            or not hasattr(tracer, "_instrumentation_scope")
        ):
            return None
        return cls(tracer, processors, ids)

    def usable(self) -> bool:
        """Still the only processor, and the tracer enabled."""
        enabled = self._enabled
        return self._multi._span_processors is self._processors and (
            enabled is None or bool(enabled())
        )

    def continued(self, name: str, traceparent: re.Match[bytes], tracestate: Any) -> LeanSpan:
        """A server span continuing a caller's sampled trace (`sampled_parent`'s match of its
        traceparent): the parent-based sampler samples it, with the caller's trace state."""
        trace_id, parent_id, flags = (int(field, 16) for field in traceparent.groups())
        state = TraceState.from_header(tracestate) if tracestate else None
        parent = SpanContext(trace_id, parent_id, True, TraceFlags(flags), state)
        return self.start(name, trace_id, flags & RANDOM_TRACE_ID, parent)

    def start(
        self, name: str, trace_id: int, random_flag: int, parent: SpanContext | None = None
    ) -> LeanSpan:
        """A sampled server span (perfmw's sampling decided on `trace_id`): a new root, or the
        child of a caller's span."""
        span_ids = self._span_ids
        span_id = (span_ids(64) or 1) if span_ids is not None else self._ids.generate_span_id()
        flags = self._random_flags[1 if random_flag else 0]
        state = parent.trace_state if parent is not None else DEFAULT_TRACE_STATE
        if CONTEXT_IS_TUPLE:  # SpanContext.__new__ without its Python call
            valid = 0 < trace_id < _ID_LIMITS[0] and 0 < span_id < _ID_LIMITS[1]
            context = _new_tuple(SpanContext, (trace_id, span_id, False, flags, state, valid))
        else:
            context = SpanContext(trace_id, span_id, False, flags, state)
        span = LeanSpan(name, context, SpanKind.SERVER, self)
        span._parent = parent
        return span
