"""What `perfmw report` reads, checked before anything uses it.

Every answer and file is read to a size cap (MAX_BYTES), JSON is parsed only once a scan has
found it nested at most MAX_DEPTH levels (so the parser never recurses deeper, whatever it is
sent) and with numbers a float holds exactly, and each document is held against the shape the
report expects: FINDINGS (`/perfmw/findings`), REPORT (`--format json`, for `--compare`),
PROMETHEUS_ANSWER (the query API). A key the shape does not name is let through (a newer perfmw
may add some), and so is a missing optional one; a value of the wrong type is refused, named by
its path:

    load(b'{"findings": ["x"]}', FINDINGS)
    -> Malformed: findings[0] that is the string "x", not an object

The words follow "answered" or "holds": the caller names the URL or file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

MAX_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
#: The largest number read: a float counts every integer up to it exactly, and sums of a few
#: million of them stay finite.
MAX_NUMBER = 2**53


class Malformed(ValueError):
    """What is wrong with a document read, in the words that follow "answered" or "holds"."""


class NotJson(Malformed):
    """The document is no JSON at all (a Markdown report, an HTML login page...)."""


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def read_capped(stream: _Readable) -> bytes:
    """At most MAX_BYTES of `stream`; Malformed when it holds more."""
    body = stream.read(MAX_BYTES + 1)
    if len(body) > MAX_BYTES:
        raise Malformed(f"more than {MAX_BYTES // 2**20} MiB")
    return body


# A JSON string (an unterminated one runs to the end: the parser will say what is wrong), and
# what is neither string nor bracket: both dropped (in C) before the brackets are counted.
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def _too_deep(text: str) -> bool:
    depth = 0
    for bracket in _NOT_BRACKETS.sub("", _STRINGS.sub("", text)):
        if bracket in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _number(text: str) -> float:
    value = float(text)
    if not abs(value) <= MAX_NUMBER:
        raise Malformed(f"the number {text[:24]}, beyond ±2**53")
    return value


def _integer(text: str) -> int:
    value = int(text)
    if abs(value) > MAX_NUMBER:
        raise Malformed(f"the number {text[:24]}, beyond ±2**53")
    return value


def _constant(name: str) -> Any:
    raise Malformed(f"{name}, which is not a JSON number")


def parse(raw: bytes) -> Any:
    """The JSON value of `raw`; Malformed when it is no JSON, nests too deep or holds a number
    beyond ±2**53 (NaN and Infinity included)."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except ValueError as exc:
        raise NotJson(f"text that is not JSON ({exc})") from None
    if _too_deep(text):
        raise Malformed(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_float=_number, parse_int=_integer, parse_constant=_constant)
    except Malformed:
        raise
    except ValueError as exc:
        raise NotJson(f"text that is not JSON ({exc})") from None


def load(raw: bytes, schema: Schema) -> Any:
    """`raw` parsed (see `parse`) and checked against `schema`."""
    document = parse(raw)
    schema.check(document, "")
    return document


# Shapes.


def describe(value: Any) -> str:
    """A value as a message names it: `the string "abc"`, `the number 3`, `a list`."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        preview = json.dumps(value[:24]) + ("..." if len(value) > 24 else "")
        return f"the string {preview}"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return f"the number {value!r}"


def _wrong(path: str, value: Any, expected: str) -> Malformed:
    found = f"{path} that is {describe(value)}" if path else describe(value)
    return Malformed(f"{found}, not {expected}")


def _key(path: str, name: str) -> str:
    if not name.isidentifier():
        return f"{path}[{json.dumps(name[:40])}]"
    return f"{path}.{name}" if path else name


class Schema(Protocol):
    expected: str  # as a message names it: "a string or null"

    def matches(self, value: Any) -> bool:
        """Whether the value is of this schema's type (its contents aside)."""

    def check(self, value: Any, path: str) -> None:
        """Malformed naming the first value under `path` that does not fit."""


class Scalar:
    def __init__(self, expected: str, test: Callable[[Any], bool]) -> None:
        self.expected = expected
        self._test = test

    def matches(self, value: Any) -> bool:
        return self._test(value)

    def check(self, value: Any, path: str) -> None:
        if not self._test(value):
            raise _wrong(path, value, self.expected)


class OneOf:
    def __init__(self, *options: Schema) -> None:
        self.options = options
        self.expected = " or ".join(option.expected for option in options)

    def matches(self, value: Any) -> bool:
        return any(option.matches(value) for option in self.options)

    def check(self, value: Any, path: str) -> None:
        for option in self.options:
            if option.matches(value):
                option.check(value, path)
                return
        raise _wrong(path, value, self.expected)


class ListOf:
    expected = "a list"

    def __init__(self, item: Schema) -> None:
        self.item = item

    def matches(self, value: Any) -> bool:
        return isinstance(value, list)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise _wrong(path, value, self.expected)
        for number, item in enumerate(value):
            self.item.check(item, f"{path}[{number}]")


class Pair:
    expected = "a list of two"

    def __init__(self, first: Schema, second: Schema) -> None:
        self.items = (first, second)

    def matches(self, value: Any) -> bool:
        return isinstance(value, list)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or len(value) != 2:
            found = f"a list of {len(value)}" if isinstance(value, list) else describe(value)
            raise Malformed(f"{path} that is {found}, not {self.expected}")
        for number, (item, schema) in enumerate(zip(value, self.items, strict=True)):
            schema.check(item, f"{path}[{number}]")


class Obj:
    """An object whose `fields`, where present, fit their schemas; `required` ones must be."""

    expected = "an object"

    def __init__(self, fields: Mapping[str, Schema], required: tuple[str, ...] = ()) -> None:
        self.fields = fields
        self.required = required

    def matches(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _wrong(path, value, self.expected)
        for name in self.required:
            if name not in value:
                raise Malformed(f"{path or 'an object'} with no {json.dumps(name)}")
        for name, schema in self.fields.items():
            if name in value:
                schema.check(value[name], _key(path, name))


class MapOf:
    """An object of any keys, each value fitting `value`."""

    expected = "an object"

    def __init__(self, value: Schema) -> None:
        self.value = value

    def matches(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _wrong(path, value, self.expected)
        for name, item in value.items():
            self.value.check(item, _key(path, name))


def _is_numeral(value: Any) -> bool:
    try:
        return isinstance(value, str) and abs(float(value)) <= MAX_NUMBER
    except ValueError:
        return False


TEXT = Scalar("a string", lambda value: isinstance(value, str))
INTEGER = Scalar("an integer", lambda value: type(value) is int)
NUMBER = Scalar("a number", lambda value: type(value) in (int, float))
NULL = Scalar("null", lambda value: value is None)
ANY_OBJECT = Scalar("an object", lambda value: isinstance(value, dict))
ANY_LIST = Scalar("a list", lambda value: isinstance(value, list))
#: A sample value as Prometheus writes it: a number in a string ("1.5"), here a finite one.
NUMERAL = Scalar("a finite number in a string", _is_numeral)

#: A finding's `detail`: the facts the report reads (see docs/findings.md).
DETAIL = Obj(
    {
        "collection": TEXT,
        "operation": TEXT,
        "shape": TEXT,
        "cause": TEXT,
        "stage": TEXT,
        "docs_examined": NUMBER,
        "docs_returned": NUMBER,
        "execution_seconds": NUMBER,
        "kind": TEXT,
        "method": TEXT,
        "repetitions": NUMBER,
        "documents": NUMBER,
        "bytes": NUMBER,
        "duration_seconds": NUMBER,
        "delayed_seconds": NUMBER,
        "requests_waiting": NUMBER,
        "sequential_seconds": NUMBER,
        "concurrent_seconds": NUMBER,
        "collections": ListOf(TEXT),
        "missing": ListOf(TEXT),
        "problems": ListOf(TEXT),
        "queries": ListOf(ANY_OBJECT),
        "index": ListOf(Pair(TEXT, OneOf(NUMBER, TEXT))),
        "stack": ListOf(TEXT),
    }
)
#: One finding, as `Finding.to_dict()` writes it.
FINDING = Obj(
    {
        "kind": TEXT,
        "route": TEXT,
        "count": INTEGER,
        "total_seconds": NUMBER,
        "location": OneOf(TEXT, NULL),
        "via": OneOf(TEXT, NULL),
        "detail": DETAIL,
        "first_seen": NUMBER,
        "last_seen": NUMBER,
    },
    required=("kind", "route", "count"),
)
#: What the findings endpoint answers.
FINDINGS = Obj(
    {"pid": OneOf(INTEGER, NULL), "pids": ListOf(INTEGER), "findings": ListOf(FINDING)},
    required=("findings",),
)
_OPTIONAL_NUMBER = OneOf(NUMBER, NULL)
#: A report written with --format json: what `render_compare` reads of it.
REPORT = Obj(
    {
        "perfmw_report": INTEGER,
        "url": TEXT,
        "routes": ListOf(
            Obj(
                {
                    "method": TEXT,
                    "route": TEXT,
                    "p50_seconds": _OPTIONAL_NUMBER,
                    "p99_seconds": _OPTIONAL_NUMBER,
                    "queries_per_request": _OPTIONAL_NUMBER,
                    "stalls": INTEGER,
                },
                required=("method", "route"),
            )
        ),
        "caches": ListOf(Obj({"cache": TEXT, "hit_rate": _OPTIONAL_NUMBER}, required=("cache",))),
        "findings": ANY_LIST,
    },
    required=("perfmw_report",),
)
#: An answer of Prometheus's query API (`/api/v1/query`); which status and result type it
#: must have is the caller's to say.
PROMETHEUS_ANSWER = Obj(
    {
        "status": TEXT,
        "data": Obj(
            {
                "resultType": TEXT,
                "result": ListOf(
                    Obj(
                        {"metric": MapOf(TEXT), "value": Pair(NUMBER, NUMERAL)},
                        required=("metric", "value"),
                    )
                ),
            },
            required=("resultType", "result"),
        ),
    },
    required=("status",),
)


def check_sample(name: str, labels: Mapping[str, str], value: float) -> None:
    """A sample the analysis reads: its value within ±2**53, a bucket's `le` a number."""
    if not abs(value) <= MAX_NUMBER:
        raise Malformed(f"a sample of {name} that is {value!r}, not a number within ±2**53")
    if name.endswith("_bucket"):
        try:
            float(labels.get("le", ""))
        except ValueError:
            raise Malformed(f"a sample of {name} with no number as its le label") from None
