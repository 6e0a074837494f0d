"""Finished spans to an OTLP ExportTraceServiceRequest, written directly in protobuf's wire format.

The exporter's own encoder builds a protobuf object per span, attribute and value before
serializing them: about 50 µs for a request's span, CPU that a traced service pays for every
span it exports. Writing the bytes directly (field tags, varint lengths) does the same in a
fraction of it. Resources and instrumentation scopes are encoded once and reused. The output is
what `opentelemetry-proto` decodes (tests/otlp_receiver.py does, in the test suite).

Message and field numbers: opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags

from ._sampling import CONTEXT_IS_TUPLE

_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_SMALL = [bytes((n,)) for n in range(128)]
_UINT64 = (1 << 64) - 1

# Span.kind (field 6): OTLP numbers them from INTERNAL = 1, OpenTelemetry's API from 0. Looked
# up by identity: hashing an Enum member is a Python call.
_KINDS = {id(kind): b"\x30" + _SMALL[kind.value + 1] for kind in SpanKind}
# Status.code (field 3), omitted when UNSET (0) as protobuf omits default values.
_STATUS_CODES = {
    id(code): b"\x18" + _SMALL[code.value] if code.value else b"" for code in StatusCode
}

# Span.flags: bit 8 says whether the parent's remoteness is known, bit 9 that it is remote.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_LOCAL_PARENT = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)  # Span.flags (field 16)
_REMOTE_PARENT = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)


def _varint(value: int) -> bytes:
    if value < 128:
        return _SMALL[value]
    if value < 16384:  # a span's length, mostly
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An AnyValue message."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode("utf-8"))
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _UINT64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    return _field(b"\x0a", str(value).encode("utf-8"))


# Caches of encodings, each bounded: attribute keys (no more are added once full), and
# resources and scopes by object (emptied when full).
_keys: dict[str, bytes] = {}
_KEYS_LIMIT = 10_000
_resources: dict[int, tuple[Any, bytes]] = {}
_RESOURCES_LIMIT = 64
_scopes: dict[int, tuple[Any, bytes]] = {}
_SCOPES_LIMIT = 256
# Encoded KeyValue fields by field tag, then by (key, value) as the attributes' dict yields
# them, with the value's type (1, 1.0 and True are equal keys but encode differently): a
# service sends the same method, route, host and status over and over, and a cached attribute
# costs one lookup instead of four encodings. Bounded: emptied when full, so values that never
# repeat (paths with ids) cannot grow it; doubles (durations, never the same twice) are not
# kept.
_pairs: dict[bytes, dict[tuple[str, Any], tuple[type, bytes]]] = {}
_PAIRS_LIMIT = 4096


def _key_value(tag: bytes, key: str, value: Any) -> bytes:
    """A KeyValue field numbered by `tag`."""
    encoded_key = _keys.get(key)
    if encoded_key is None:
        encoded_key = _field(b"\x0a", key.encode("utf-8"))
        if len(_keys) < _KEYS_LIMIT:
            _keys[key] = encoded_key
    return _field(tag, encoded_key + _field(b"\x12", _any_value(value)))


# KeyValue fields of a double up to its 8 bytes, by (tag, key): bounded as the keys are.
_double_prefixes: dict[tuple[bytes, str], bytes] = {}


def _double_key_value(tag: bytes, key: str, value: float) -> bytes:
    """A KeyValue field whose value is a double: durations, never the same twice."""
    prefix = _double_prefixes.get((tag, key))
    if prefix is None:
        prefix = _key_value(tag, key, 0.0)[:-8]
        if len(_double_prefixes) < _KEYS_LIMIT:
            _double_prefixes[(tag, key)] = prefix
    return prefix + _DOUBLE(value)


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue fields numbered by `tag`."""
    if not attributes:
        return b""
    parts = []
    pairs = _pairs.get(tag)
    if pairs is None:
        pairs = _pairs[tag] = {}
    # The SDK's BoundedAttributes keeps a plain dict: iterating it directly saves a Python
    # call per attribute.
    for item in getattr(attributes, "_dict", attributes).items():
        try:
            hit = pairs.get(item)
        except TypeError:  # an unhashable value (a list)
            parts.append(_key_value(tag, *item))
            continue
        value = item[1]
        if hit is not None and hit[0] is value.__class__:
            parts.append(hit[1])
            continue
        if value.__class__ is float:
            parts.append(_double_key_value(tag, item[0], value))
            continue
        encoded = _key_value(tag, item[0], value)
        parts.append(encoded)
        if len(pairs) >= _PAIRS_LIMIT:
            pairs.clear()
        pairs[item] = (value.__class__, encoded)
    return b"".join(parts)


def _trace_state(state: Any) -> bytes:
    if not state:
        return b""
    return _field(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items()).encode("utf-8"))


# A span's fields in one C call: the SDK ReadableSpan's own, not its properties (a Python call
# each, and `attributes` makes a read-only view per call); the properties should a release
# keep them differently.
_FIELDS = [
    "context",
    "parent",
    "name",
    "kind",
    "start_time",
    "end_time",
    "attributes",
    "events",
    "links",
    "status",
    "resource",
    "instrumentation_scope",
]
_OWN_FIELDS = operator.attrgetter(*(f"_{name}" for name in _FIELDS))
_PUBLIC_FIELDS = operator.attrgetter(*_FIELDS)
_SAMPLED = TraceFlags.SAMPLED
# Span.start_time_unix_nano and end_time_unix_nano (fields 7 and 8, fixed64), in one call.
_TIMES = struct.Struct("<BQBQ").pack
# Span.name (field 5) by name, bounded as the attribute pairs are: names are routes, mostly.
_names: dict[str, bytes] = {}
# Span.status (field 15) of a status without description, by code.
_STATUSES = {id(code): _field(b"\x7a", _STATUS_CODES[id(code)]) for code in StatusCode}


def _dropped(container: Any, span: Any, name: str) -> int:
    """How many attributes, events or links the SDK dropped (its bounded containers count),
    else what the object's `name` property says."""
    dropped = getattr(container, "dropped", None)
    return int(getattr(span, name, 0) if dropped is None else dropped)


def sampled_span(span: Any) -> tuple[Any, Any, bytes] | None:
    """A sampled span's resource, instrumentation scope, and the span as a field of their
    ScopeSpans message (`encode_request` groups such fields); None for a span not sampled."""
    try:
        fields = _OWN_FIELDS(span)
        own = True
    except AttributeError:
        fields = _PUBLIC_FIELDS(span)
        own = False
    context, parent, name, kind, start, end, attributes, events, links, status, *rest = fields
    if context is None:
        return None
    if CONTEXT_IS_TUPLE and context.__class__ is SpanContext:  # no property calls
        trace_id, span_id, _, flags, trace_state, _ = context
    else:
        trace_id, span_id = context.trace_id, context.span_id
        flags, trace_state = context.trace_flags, context.trace_state
    if not flags & _SAMPLED:
        return None
    encoded_name = _names.get(name)
    if encoded_name is None:
        encoded_name = _field(b"\x2a", name.encode("utf-8"))
        if len(_names) >= _PAIRS_LIMIT:
            _names.clear()
        _names[name] = encoded_name
    parts = [b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")]
    if trace_state:
        parts.append(_trace_state(trace_state))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(encoded_name)
    parts.append(_KINDS[id(kind)])
    parts.append(_TIMES(0x39, start or 0, 0x41, end or 0))
    parts.append(_attributes(b"\x4a", attributes))
    # A span's own plain dict or tuple drops nothing (perfmw's LeanSpan keeps them until the
    # application adds to it): no count to look up.
    if not own or attributes.__class__ is not dict:
        dropped = _dropped(attributes, span, "dropped_attributes")
        if dropped:
            parts.append(b"\x50" + _varint(dropped))
    if events:
        _events(parts, events)
    if not own or events.__class__ is not tuple:
        dropped = _dropped(events, span, "dropped_events")
        if dropped:
            parts.append(b"\x60" + _varint(dropped))
    if links:
        _links(parts, links)
    if not own or links.__class__ is not tuple:
        dropped = _dropped(links, span, "dropped_links")
        if dropped:
            parts.append(b"\x70" + _varint(dropped))
    if status is not None:
        if status.description:
            code = _STATUS_CODES[id(status.status_code)]
            code = _field(b"\x12", status.description.encode("utf-8")) + code
            parts.append(_field(b"\x7a", code))
        else:
            parts.append(_STATUSES[id(status.status_code)])
    parts.append(_REMOTE_PARENT if parent is not None and parent.is_remote else _LOCAL_PARENT)
    body = b"".join(parts)
    resource, scope = rest
    return resource, scope, b"\x12" + _varint(len(body)) + body


def _events(parts: list[bytes], events: Iterable[Any]) -> None:
    for event in events:
        body = (
            b"\x09"
            + _FIXED64(event.timestamp)
            + _field(b"\x12", event.name.encode("utf-8"))
            + _attributes(b"\x1a", event.attributes)
        )
        dropped = _dropped(event.attributes, event, "dropped_attributes")  # 1.25: no property
        if dropped:
            body += b"\x20" + _varint(dropped)
        parts.append(_field(b"\x5a", body))


def _links(parts: list[bytes], links: Iterable[Any]) -> None:
    for link in links:
        linked = link.context
        body = (
            b"\x0a\x10"
            + linked.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + linked.span_id.to_bytes(8, "big")
            + _trace_state(linked.trace_state)
            + _attributes(b"\x22", link.attributes)
        )
        dropped = _dropped(link.attributes, link, "dropped_attributes")
        if dropped:
            body += b"\x28" + _varint(dropped)
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if linked.is_remote else 0)
        parts.append(_field(b"\x6a", body + b"\x35" + _FIXED32(flags)))


def _resource(resource: Any) -> bytes:
    """Resource message and ResourceSpans.schema_url, cached per resource object."""
    cached = _resources.get(id(resource))
    if cached is not None and cached[0] is resource:
        return cached[1]
    encoded = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
    if len(_resources) >= _RESOURCES_LIMIT:
        _resources.clear()
    _resources[id(resource)] = (resource, encoded)
    return encoded


def _scope(scope: Any) -> bytes:
    """InstrumentationScope message (field 1 of ScopeSpans), cached per scope object."""
    if scope is None:
        return b""
    cached = _scopes.get(id(scope))
    if cached is not None and cached[0] is scope:
        return cached[1]
    body = _field(b"\x0a", scope.name.encode("utf-8"))
    if scope.version:
        body += _field(b"\x12", scope.version.encode("utf-8"))
    body += _attributes(b"\x1a", getattr(scope, "attributes", None))
    encoded = _field(b"\x0a", body)
    if scope.schema_url:
        encoded += _field(b"\x1a", scope.schema_url.encode("utf-8"))
    if len(_scopes) >= _SCOPES_LIMIT:
        _scopes.clear()
    _scopes[id(scope)] = (scope, encoded)
    return encoded


#: Encoded span fields of one resource and instrumentation scope, as `encode_request` takes them.
Group = tuple[Any, Any, list[bytes]]


def encode_request(groups: Iterable[Group]) -> bytes:
    """A serialized ExportTraceServiceRequest of (resource, scope, encoded spans) groups."""
    by_resource: dict[int, tuple[Any, list[bytes]]] = {}
    for resource, scope, spans in groups:
        scope_spans = _field(b"\x12", _scope(scope) + b"".join(spans))
        by_resource.setdefault(id(resource), (resource, []))[1].append(scope_spans)
    out = []
    for resource, scopes in by_resource.values():
        body = _resource(resource) + b"".join(scopes)
        if resource.schema_url:
            body += _field(b"\x1a", resource.schema_url.encode("utf-8"))
        out.append(_field(b"\x0a", body))
    return b"".join(out)
