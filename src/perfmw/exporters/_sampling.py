"""Unsampled requests for the price of a random number, with the usual ratio sampler.

The SDK's `start_span` costs about 4 µs for a span it then drops (sampler result objects,
SpanContext validation, its own metrics), plus 2 µs to extract the headers. For the set-up
almost everyone samples with, `ParentBased(TraceIdRatioBased(r))` (or the SDK's default
`ParentBased(ALWAYS_ON)`, the ratio 1) with its default delegates and W3C propagation, the
decision needs only the trace id: this module takes it, and builds the dropped span's context
only if something asks for it (a child span, a propagator). Sampled requests still go through
the SDK, with the trace id the decision was made on (and no header extraction for new roots).
The decision itself is made per request in `tracing.RatioTracing.start`; here are its parts.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

# The root sampler: a ratio, or always on (the SDK's default, the ratio 1).
_PARENT_BASED_RATIO = re.compile(
    r"ParentBased\{root:(?:TraceIdRatioBased\{([^{}]+)\}|AlwaysOnSampler),"
    r"remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
    r"localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler\}"
)
_W3C_FIELDS = ({"traceparent", "tracestate"}, {"traceparent", "tracestate", "baggage"})
W3C_HEADERS = frozenset((b"traceparent", b"tracestate", b"baggage"))
TRACE_ID_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
# W3C's random-trace-id flag (0x02): older OpenTelemetry APIs (1.25, the oldest
# supported) have no such flag, and perfmw sets none there.
RANDOM_TRACE_ID: int = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
# A version-00 traceparent with non-zero ids whose parent was not sampled (flags' low bit 0):
# everything the fast path needs to know, in one match. Anything else (a sampled parent, other
# versions, spaces, upper case) goes to the SDK's propagator, which decides as before.
unsampled_parent = re.compile(
    rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]"
).fullmatch
# The same with a sampled parent (flags' low bit 1): its trace id, span id and flags.
sampled_parent = re.compile(
    rb"00-((?!0{32})[0-9a-f]{32})-((?!0{16})[0-9a-f]{16})-([0-9a-f][13579bdf])"
).fullmatch


class PresetIds(IdGenerator):
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
        # Older SDKs' generators (1.25, the oldest supported) have no such method.
        method = getattr(self.inner, "is_trace_id_random", None)
        return bool(method()) if method is not None else False


class UnsampledSpan(NonRecordingSpan):
    """A dropped request span whose SpanContext is built the first time it is asked for.

    Its trace id is an int (a new root) or still the parent's traceparent header, read then.

    It is also what `record.span` holds for its request (the fields of tracing.RequestSpan):
    one object per dropped request instead of two.
    """

    # The RequestSpan fields: perfmw's own span, nothing recorded, no exemplar.
    owned = True
    recording = False
    exemplar = None
    _context = None  # type: ignore[assignment]  # the SpanContext, once asked for

    def __init__(
        self, trace_id: int | bytes, flags: int, trace_state: list[str] | None, ids: IdGenerator
    ) -> None:
        self._trace_id = trace_id
        self._flags = flags
        self._trace_state = trace_state
        self._ids = ids

    @property
    def span(self) -> UnsampledSpan:
        return self

    def get_span_context(self) -> SpanContext:
        context: SpanContext | None = self._context
        if context is None:
            raw, flags = self._trace_id, self._flags
            if isinstance(raw, int):
                trace_id = raw
            else:  # the header, validated: 00-<trace id>-<parent id>-<flags>
                trace_id = int(raw[3:35], 16)
                flags = int(raw[53:55], 16) & RANDOM_TRACE_ID
            state = TraceState.from_header(self._trace_state) if self._trace_state else None
            context = self._context = SpanContext(
                trace_id,
                self._ids.generate_span_id(),
                is_remote=False,
                trace_flags=TraceFlags(flags),
                trace_state=state,
            )
        return context


def ratio_sampling(provider: Any, tracer: Any) -> tuple[PresetIds, int] | None:
    """For a provider sampling with ParentBased(TraceIdRatioBased) or ParentBased(ALWAYS_ON)
    (the SDK's default), with their default delegates: our tracer's id generator (made a
    PresetIds) and the bound below which a root's trace id is sampled. None for any other
    sampler: the SDK decides every request."""
    sampler = getattr(provider, "sampler", None)
    ids = getattr(tracer, "id_generator", None)
    if sampler is None or not isinstance(ids, IdGenerator):
        return None
    match = _PARENT_BASED_RATIO.fullmatch(sampler.get_description())
    if match is None:
        return None
    try:
        bound = TraceIdRatioBased.get_bound_for_rate(float(match.group(1) or 1.0))
    except ValueError:
        return None
    preset = ids if isinstance(ids, PresetIds) else PresetIds(ids)
    tracer.id_generator = preset  # our own Tracer instance: the app's tracers are untouched
    return preset, bound


def w3c_only(textmap: Any) -> bool:
    """Whether a propagator is W3C trace context (and baggage) only: what the fast path reads."""
    return set(textmap.fields) in _W3C_FIELDS


def random_trace_ids(ids: PresetIds) -> Callable[[int], int] | None:
    """`random.getrandbits` when the SDK's default generator makes the trace ids (it calls
    getrandbits(128): called directly, a call less); None for a custom generator."""
    return random.getrandbits if type(ids.inner) is RandomIdGenerator else None


def _context_is_tuple() -> bool:
    """Whether this API's SpanContext is the tuple (trace_id, span_id, is_remote, trace_flags,
    trace_state, is_valid) it has long been. Its fields are properties, a Python call each:
    perfmw then builds and reads the contexts of its own spans as tuples."""
    state = TraceState([("k", "v")])
    probe = SpanContext(3, 5, True, TraceFlags(1), state)
    return isinstance(probe, tuple) and tuple(probe) == (3, 5, True, TraceFlags(1), state, True)


CONTEXT_IS_TUPLE = _context_is_tuple()
