"""Hashes of a MongoDB command's values, so that two commands can be compared without keeping
what they held.

    command = {"find": "users", "filter": {"_id": 7}}
    read_hash("find", command, shape)            # the same int for every find of _id 7
    filter_hashes("find", command)               # {hash(7)}
    reply_hashes([{"_id": 7, "token": "abc"}])   # {hash(7), hash("abc")}

A value never leaves this module, only `hash()` of it: `read_hash` tells a read sent again with
the same values (duplicate_read), and a filter hash found among an earlier reply's hashes says
the later read used what the earlier one returned (so it could not have run beside it, see
consecutive_queries). A filter of plain values is hashed as it is; one of documents and lists of
plain values is serialized whole by `marshal`, in C, at a cost that grows with it as the driver's
own encoding of it does. Every walk in Python is bounded: a filter or pipeline holding ObjectIds
or dates past `MAX_LEAVES` values gets no hash, a large reply none either, and no set holds more
than `MAX_HASHES`.
"""

from __future__ import annotations

import datetime
import marshal
import uuid
from collections.abc import Mapping
from typing import Any

from bson import Binary, DBRef, Int64, ObjectId

#: Values of one filter or pipeline walked for `read_hash` (a larger one gets no hash).
MAX_LEAVES = 64
#: Stages of a pipeline hashed the fast way (a longer one is walked like a nested filter).
MAX_STAGES = 8
#: Hashes kept per query, of its filter or of its reply.
MAX_HASHES = 32
#: Documents of a reply's first batch hashed: the first ones, which a loop over the reply
#: reads first (the read that could start a consecutive run is its first iteration).
MAX_REPLY_DOCUMENTS = 8
# Values that identify something: another read filtering on one probably got it from a reply.
# Booleans, None, and 0, 1, -1 and "" (their hashes) are in too many documents to say so.
_IDENTIFYING = frozenset(
    {str, int, float, bytes, ObjectId, Int64, Binary, uuid.UUID, datetime.datetime}
)
_COMMON_HASHES = frozenset({hash(0), hash(1), hash(-1), hash("")})
# Values hashed as they are (a document of only these is hashed in one C-level pass). The
# hashes of booleans and None land in a reply's set too: a filter's never holds them.
_FLAT = _IDENTIFYING | {bool, type(None)}
# Markers that keep {"a": [1, 2]} and {"a": 1, "b": 2} apart in the flattened values.
_MAPPING, _LIST = object(), object()


def _flatten(value: Any, out: list[Any]) -> bool:
    """Append `value`'s keys and leaves to `out`; False past `MAX_LEAVES`."""
    kind = type(value)
    if (kind is dict or kind is list) and len(out) + len(value) > MAX_LEAVES:
        return False
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        out.append(_MAPPING)
        for key, item in value.items():
            out.append(key)
            if type(item) is dict or type(item) is list:
                if not _flatten(item, out):
                    return False
            else:
                out.append(item)
    elif kind is list:
        out.append(_LIST)
        for item in value:
            if type(item) is dict or type(item) is list:
                if not _flatten(item, out):
                    return False
            else:
                out.append(item)
    else:
        out.append(value)
    return len(out) <= MAX_LEAVES


def read_hash(name: str, command: Mapping[str, Any], shape: str) -> int | None:
    """One hash of a read's shape and of every value that decides its result, or None (too
    large, or a value that cannot be hashed, like a regular expression)."""
    if name == "find":
        body = command.get("filter")
    elif name == "aggregate":
        body = command.get("pipeline")
    else:
        body = command.get("query")
    if type(body) is dict:
        values = tuple(body.values())
        for value in values:  # (a loop: map(type, ...) costs twice as much)
            if type(value) not in _FLAT:
                break
        else:  # the common filter: its keys are in the shape, its values are all there is
            return hash((shape, command.get("skip"), command.get("limit"), values))
    try:  # documents, lists and plain values only: serialized in one C-level pass
        serialized = marshal.dumps(body, 2)  # version 2: the same bytes for the same values
        return hash((shape, command.get("skip"), command.get("limit"), serialized))
    except ValueError:  # an ObjectId, a datetime, a SON...: walked below
        pass
    try:
        if type(body) is dict:
            parts = _spec([shape, command.get("skip"), command.get("limit")], body)
            if parts is not None:
                return hash(tuple(parts))
        if type(body) is list and len(body) <= MAX_STAGES:
            stages = _stages(body)
            if stages is not None:
                return hash((shape, *stages))
        return _nested_hash(command, body, shape)
    except TypeError:  # deeper than _stages looks, or a value that has no hash
        try:
            return _nested_hash(command, body, shape)
        except TypeError:
            return None


def _stages(pipeline: list[Any]) -> list[Any] | None:
    """A pipeline's stages as a flat list, fast, for one whose stages hold values or
    documents of values (count_documents' `$match` and `$group`, a `$sort`, a `$limit`)."""
    parts: list[Any] = []
    for stage in pipeline:
        if type(stage) is not dict:
            return None
        for name, spec in stage.items():
            parts.append(name)
            if type(spec) is dict:
                if _spec(parts, spec) is None:
                    return None
            else:
                parts.append(spec)
    return parts


def _spec(parts: list[Any], spec: dict[str, Any]) -> list[Any] | None:
    """`spec`'s keys and values appended to `parts`, an operator's or a sub-document's items
    as one tuple (hashing fails if they nest deeper), a list as one tuple; None if too large."""
    if len(spec) > MAX_LEAVES:
        return None
    for key, value in spec.items():
        parts.append(key)
        kind = type(value)
        if kind is dict:
            items = tuple(value.items())
            for _key, item in items:
                if type(item) is list:  # {"$in": [...]}
                    if len(item) > MAX_LEAVES:
                        return None
                    items = tuple((k, tuple(v) if type(v) is list else v) for k, v in items)
                    break
            parts.append(items)
        elif kind is list:
            if len(value) > MAX_LEAVES:
                return None
            parts.append(tuple(value))
        else:
            parts.append(value)
    return parts


def _nested_hash(command: Mapping[str, Any], body: Any, shape: str) -> int | None:
    out: list[Any] = [shape, command.get("skip"), command.get("limit")]
    if not _flatten(body, out):
        return None
    return hash(tuple(out))


def filter_hashes(name: str, command: Mapping[str, Any]) -> set[int]:
    """Hashes of the identifying values of a read's filter (or pipeline), at most MAX_HASHES.

    0, 1, -1 and "" are left out (as booleans and None are): too many documents hold them for
    a reply holding one to say the filter took it from there.
    """
    found: set[int] = set()
    key = "filter" if name == "find" else "pipeline" if name == "aggregate" else "query"
    todo: list[Any] = [command.get(key)]
    walked = 0
    while todo and walked < MAX_LEAVES and len(found) < MAX_HASHES:
        value = todo.pop()
        walked += 1
        kind = type(value)
        if kind in _IDENTIFYING:
            hashed = hash(value)
            if hashed not in _COMMON_HASHES:
                found.add(hashed)
        elif isinstance(value, list):
            todo.extend(value[:MAX_LEAVES])
        elif isinstance(value, Mapping):
            todo.extend(value.values())
    return found


def reply_hashes(documents: list[Any]) -> set[int]:
    """Hashes of the identifying values of a reply's first MAX_REPLY_DOCUMENTS documents: each
    one's fields and the fields (or items) of its sub-documents (or lists) one level down, and
    the id a DBRef points at (an ODM's link), at most MAX_HASHES.

    This runs for every small read, so it is written for speed: a document of plain values is
    hashed in one C-level pass, and common values are not filtered out here (the filter's side
    leaves them out, so they never match).
    """
    found: set[int] = set()
    for document in documents[:MAX_REPLY_DOCUMENTS]:
        values = document.values()
        if _FLAT.issuperset(map(type, values)):
            found.update(map(hash, values))
        else:
            for value in values:
                kind = type(value)
                if kind in _FLAT:
                    found.add(hash(value))
                elif kind is DBRef:
                    found.add(hash(value.id))
                elif kind is dict or kind is list:
                    for item in value.values() if kind is dict else value[:MAX_HASHES]:
                        if type(item) in _FLAT:
                            found.add(hash(item))
        if len(found) >= MAX_HASHES:
            break
    while len(found) > MAX_HASHES:
        found.pop()
    return found
