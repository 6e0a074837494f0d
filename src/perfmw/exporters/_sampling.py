"""Unsampled requests for the price of a random number, with the usual ratio sampler.

The SDK's `start_span` costs about 4 µs for a span it then drops (sampler result objects,
SpanContext validation, its own metrics), plus 2 µs to extract the headers. For the set-up
almost everyone samples with, `ParentBased(TraceIdRatioBased(r))` with its default delegates
and W3C propagation, the decision needs only the trace id: this module takes it, and builds
the dropped span's context only if something asks for it (a child span, a propagator).
Sampled requests still go through the SDK, with the trace id the decision was made on.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

_PARENT_BASED_RATIO = re.compile(
    r"ParentBased\{root:TraceIdRatioBased\{([^{}]+)\},"
    r"remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
    r"localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler\}"
)
_W3C_FIELDS = ({"traceparent", "tracestate"}, {"traceparent", "tracestate", "baggage"})
_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
_INVALID_PARENT = b"0" * 16


class _PresetIds(IdGenerator):
    """Our tracer's id generator: the trace id the sampling decision was made on, else the
    provider's generator."""

    def __init__(self, inner: IdGenerator) -> None:
        self.inner = inner
        self.local = threading.local()

    def generate_span_id(self) -> int:
        return self.inner.generate_span_id()

    def generate_trace_id(self) -> int:
        preset: int | None = getattr(self.local, "trace_id", None)
        if preset is not None:
            self.local.trace_id = None
            return preset
        return self.inner.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return self.inner.is_trace_id_random()


class UnsampledSpan(NonRecordingSpan):
    """A dropped request span whose SpanContext is built the first time it is asked for.

    It is also what `record.span` holds for its request (the fields of tracing.RequestSpan):
    one object per dropped request instead of two.
    """

    # The RequestSpan fields: perfmw's own span, nothing recorded, no exemplar.
    owned = True
    recording = False
    exemplar = None

    def __init__(
        self, trace_id: int, flags: int, trace_state: list[str] | None, ids: IdGenerator
    ) -> None:
        self._context = None  # type: ignore[assignment]
        self._trace_id = trace_id
        self._flags = flags
        self._trace_state = trace_state
        self._ids = ids
        self.token: object = None  # the context token to detach when the app call returns

    @property
    def span(self) -> UnsampledSpan:
        return self

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            state = TraceState.from_header(self._trace_state) if self._trace_state else None
            context = self._context = SpanContext(
                self._trace_id,
                self._ids.generate_span_id(),
                is_remote=False,
                trace_flags=TraceFlags(self._flags),
                trace_state=state,
            )
        return context


class FastSampling:
    """The decision for one tracer whose provider samples with ParentBased(TraceIdRatioBased)."""

    __slots__ = ("bound", "ids", "random_bits", "random_flag", "tracer")

    def __init__(self, tracer: Any, ids: _PresetIds, bound: int) -> None:
        self.tracer = tracer
        self.ids = ids
        self.bound = bound
        self.random_flag = TraceFlags.RANDOM_TRACE_ID if ids.is_trace_id_random() else 0
        # The SDK's default generator is random.getrandbits(128): called directly, one call less.
        default = type(ids.inner) is RandomIdGenerator
        self.random_bits = random.getrandbits if default else None

    @classmethod
    def for_tracer(cls, provider: Any, tracer: Any) -> FastSampling | None:
        sampler = getattr(provider, "sampler", None)
        ids = getattr(tracer, "id_generator", None)
        if sampler is None or not isinstance(ids, IdGenerator):
            return None
        match = _PARENT_BASED_RATIO.fullmatch(sampler.get_description())
        if match is None:
            return None
        try:
            bound = TraceIdRatioBased.get_bound_for_rate(float(match.group(1)))
        except ValueError:
            return None
        preset = ids if isinstance(ids, _PresetIds) else _PresetIds(ids)
        tracer.id_generator = preset  # our own Tracer instance: the app's tracers are untouched
        return cls(tracer, preset, bound)

    @staticmethod
    def applies(textmap: Any) -> bool:
        """Whether the global propagator is W3C trace context (and baggage) only."""
        return set(textmap.fields) in _W3C_FIELDS

    def start(self, name: str, headers: Sequence[tuple[bytes, bytes]]) -> Any:
        """The request's span, or None when the SDK must decide (baggage, a sampled parent)."""
        traceparent = None
        tracestate: list[str] | None = None
        for key, value in headers:
            if key == b"traceparent":
                traceparent = value
            elif key == b"tracestate":
                tracestate = [*(tracestate or ()), bytes(value).decode("latin-1")]
            elif key == b"baggage":
                return None
        if traceparent is None:
            random_bits = self.random_bits
            trace_id = (
                (random_bits(128) or 1) if random_bits else self.ids.inner.generate_trace_id()
            )
            if trace_id & _LIMIT < self.bound:
                self.ids.local.trace_id = trace_id
                return self.tracer.start_span(name, None, SpanKind.SERVER)
            return UnsampledSpan(trace_id, self.random_flag, None, self.ids)
        parts = bytes(traceparent).split(b"-")
        if (
            len(parts) != 4
            or parts[0] != b"00"
            or len(parts[1]) != 32
            or len(parts[2]) != 16
            or len(parts[3]) != 2
            or parts[2] == _INVALID_PARENT
        ):
            return None
        try:
            trace_id = int(parts[1], 16)
            flags = int(parts[3], 16)
        except ValueError:
            return None
        if flags & TraceFlags.SAMPLED or trace_id == otel_trace.INVALID_TRACE_ID:
            return None
        return UnsampledSpan(trace_id, flags & TraceFlags.RANDOM_TRACE_ID, tracestate, self.ids)
