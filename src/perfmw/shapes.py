"""Query shapes: a MongoDB command with its values replaced by `?`.

    shape_of("find", {"find": "agents", "filter": {"server_id": 7}}, database="registry")
    -> 'find registry.agents {server_id: ?}'

A shape keeps what decides how the server runs a command (operation, namespace, filter keys and
operators in their order, sort keys and directions, projection keys, pipeline stage names) and
drops every value, so that the 20 queries of an N+1 loop share one shape and no user data leaves
the process. `$in`/`$nin`/`$all` lists collapse to `[?]` whatever their length.
With `capture_values=True` (the `capture_statement` setting) values are kept, shortened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_VALUE = "?"
_MAX_VALUE_CHARS = 64
_MAX_DEPTH = 8
# Operators whose operand is a list of values (collapsed) rather than a list of sub-filters.
_VALUE_LISTS = frozenset({"$in", "$nin", "$all"})
# Aggregation stages whose filter is worth keeping in the shape (as for a find).
_MATCH_STAGES = frozenset({"$match"})
_LOGICAL = frozenset({"$and", "$or", "$nor"})


def _value(value: Any, capture: bool) -> str:
    if not capture:
        return _VALUE
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _filter(document: Mapping[str, Any], capture: bool, depth: int = 0) -> str:
    """`{a: ?, b: {$gt: ?}, $or: [{c: ?}, {d: ?}]}`: keys and operators in order, no values."""
    if depth > _MAX_DEPTH:
        return "{...}"
    parts = []
    for key, value in document.items():
        kind = type(value)
        if kind is dict and value and _is_operator_doc(value):
            parts.append(f"{key}: {_operators(value, capture, depth + 1)}")
        elif kind is list and key in _LOGICAL:
            parts.append(f"{key}: {_filters(value, capture, depth + 1)}")
        elif capture:
            parts.append(f"{key}: {_value(value, capture)}")
        else:
            parts.append(f"{key}: ?")  # the hot path: a plain equality
    return "{" + ", ".join(parts) + "}"


def _is_operator_doc(value: Mapping[str, Any]) -> bool:
    for key in value:
        return isinstance(key, str) and key.startswith("$")
    return False


def _operators(document: Mapping[str, Any], capture: bool, depth: int) -> str:
    parts = []
    for op, operand in document.items():
        if op in _VALUE_LISTS:
            rendered = "[?]" if not capture else _value(operand, capture)
        elif op == "$elemMatch" and isinstance(operand, dict):
            rendered = _filter(operand, capture, depth + 1)
        elif op == "$not" and isinstance(operand, dict):
            rendered = _operators(operand, capture, depth + 1)
        else:
            rendered = _value(operand, capture)
        parts.append(f"{op}: {rendered}")
    return "{" + ", ".join(parts) + "}"


def _filters(items: list[Any], capture: bool, depth: int) -> str:
    rendered = [
        _filter(item, capture, depth) if isinstance(item, Mapping) else _value(item, capture)
        for item in items
    ]
    return "[" + ", ".join(rendered) + "]"


def _keys(document: Any) -> str:
    if isinstance(document, (Mapping, list, tuple)):
        return "[" + ", ".join(map(str, document)) + "]"
    return _VALUE


def _sort(document: Any) -> str:
    if isinstance(document, Mapping):
        return "{" + ", ".join([f"{key}: {way}" for key, way in document.items()]) + "}"
    return _VALUE


def _pipeline(stages: Any, capture: bool) -> str:
    if not isinstance(stages, list):
        return "[?]"
    parts = []
    for stage in stages:
        if not isinstance(stage, Mapping) or not stage:
            parts.append("?")
            continue
        name = next(iter(stage))
        body = stage[name]
        if name in _MATCH_STAGES and isinstance(body, Mapping):
            parts.append(f"{name} {_filter(body, capture)}")
        elif name == "$lookup" and isinstance(body, Mapping) and "from" in body:
            parts.append(f"{name} {body['from']}")
        else:
            parts.append(str(name))
    return "[" + ", ".join(parts) + "]"


def _first_statement(statements: Any) -> Mapping[str, Any] | None:
    if isinstance(statements, list) and statements and isinstance(statements[0], Mapping):
        return statements[0]
    return None


# Shapes of finds and aggregates keyed by their structure: an application sends a few shapes
# many times, and building this key costs a fraction of building the shape.
_cached_shapes: dict[tuple[Any, ...], str] = {}
_MAX_CACHED = 10_000
_RECURSIVE_OPERATORS = frozenset({"$elemMatch", "$not"})
_NESTING = frozenset({dict, list})


def _filter_key(found: Any) -> tuple[Any, ...] | None:
    """What decides a filter's shape, or None when it nests deeper than one operator."""
    if not found:
        return ()
    if type(found) is not dict:
        return None
    parts: list[Any] = []
    for key, value in found.items():
        kind = type(value)
        if kind is dict:
            for first in value:  # an operator document: {"$gt": 5}
                if type(first) is str and first[:1] == "$":
                    if not _RECURSIVE_OPERATORS.isdisjoint(value):
                        return None
                    parts.append((key, *value))
                else:
                    parts.append(key)
                break
            else:
                parts.append(key)
            continue
        if kind is list and key in _LOGICAL:
            return None
        parts.append(key)
    return tuple(parts)


def _pipeline_key(command: Mapping[str, Any], database: str) -> tuple[Any, ...] | None:
    """What decides an aggregate's shape, or None to build it without the cache."""
    pipeline = command.get("pipeline")
    if type(pipeline) is not list:
        return None
    stages: list[Any] = [database, command.get("aggregate")]
    for stage in pipeline:
        if type(stage) is not dict or not stage:
            return None
        name = next(iter(stage))
        if name in _MATCH_STAGES:
            found = _filter_key(stage[name])
            if found is None:
                return None
            stages.append((name, found))
        elif name == "$lookup":
            body = stage[name]
            stages.append((name, body.get("from") if type(body) is dict else None))
        else:
            stages.append(name)
    return tuple(stages)


def shape_of(
    command_name: str,
    command: Mapping[str, Any],
    capture_values: bool = False,
    database: str = "",
) -> str:
    """The shape of one command: `"{operation} {database}.{collection} {details}"`."""
    # Finds and aggregates, the commands sent most, are cached by what decides their shape,
    # worked out here inline: this runs for every command.
    key: tuple[Any, ...] | None = None
    if capture_values:
        pass
    elif command_name == "find":
        found = command.get("filter")
        keys: tuple[Any, ...] | None
        if type(found) is dict:
            # A loop of bytecodes: map(type, ...) calls type() through C at twice the cost.
            for value in found.values():
                if type(value) in _NESTING:  # an operator document or a logical list
                    keys = _filter_key(found)
                    break
            else:
                keys = tuple(found)  # equalities only: the common filter
        else:
            keys = _filter_key(found)
        if keys is not None:
            sort = command.get("sort")
            projection = command.get("projection")
            key = (
                database,
                command.get("find"),
                keys,
                tuple(sort.items()) if type(sort) is dict else sort,
                tuple(projection) if type(projection) is dict else projection,
            )
    elif command_name == "aggregate":
        key = _pipeline_key(command, database)
    if key is None:
        return _shape(command_name, command, capture_values, database)
    try:
        return _cached_shapes[key]
    except KeyError:
        shape = _shape(command_name, command, False, database)
        if len(_cached_shapes) < _MAX_CACHED:
            _cached_shapes[key] = shape
        return shape
    except TypeError:  # an unhashable part (a $meta sort): no caching
        return _shape(command_name, command, False, database)


def _shape(
    command_name: str, command: Mapping[str, Any], capture_values: bool, database: str
) -> str:
    target = command.get(command_name)
    collection = target if isinstance(target, str) else ""
    namespace = f"{database}.{collection}" if database else collection
    head = f"{command_name} {namespace}"
    capture = capture_values
    if command_name == "find":
        found = command.get("filter")
        text = f"{head} {_filter(found, capture) if isinstance(found, Mapping) else '{}'}"
        sort = command.get("sort")
        if sort:
            text += f" sort={_sort(sort)}"
        projection = command.get("projection")
        if projection:
            text += f" projection={_keys(projection)}"
        return text
    if command_name == "aggregate":
        return f"{head} {_pipeline(command.get('pipeline'), capture)}"
    if command_name in ("count", "distinct"):
        query = command.get("query")
        text = f"{head} {_filter(query, capture) if isinstance(query, Mapping) else '{}'}"
        if command_name == "distinct":
            text += f" key={command.get('key')}"
        return text
    if command_name == "findAndModify":
        query = command.get("query")
        text = f"{head} {_filter(query, capture) if isinstance(query, Mapping) else '{}'}"
        sort = command.get("sort")
        if sort:
            text += f" sort={_sort(sort)}"
        update = command.get("update")
        if isinstance(update, Mapping):
            text += f" update={_keys(update)}"
        elif command.get("remove"):
            text += " remove"
        return text
    if command_name in ("update", "delete"):
        first = _first_statement(command.get(command_name + "s"))
        if first is None:
            return head
        query = first.get("q")
        text = f"{head} {_filter(query, capture) if isinstance(query, Mapping) else '{}'}"
        update = first.get("u")
        if isinstance(update, Mapping):
            text += f" update={_keys(update)}"
        elif isinstance(update, list):
            text += f" update={_pipeline(update, False)}"
        return text
    return head
