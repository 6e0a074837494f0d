"""The HTTP checklist: large bodies sent uncompressed, large GETs without cache validators.

A body over 512 KiB sent without Content-Encoding, or a GET body over 64 KiB sent with neither
Cache-Control nor ETag, is a `large_response` finding located at the route's handler.
"""

from __future__ import annotations

import inspect
from typing import Any

from .._frames import format_location
from ..findings import Finding
from ..record import RequestRecord
from ..settings import Settings

UNCOMPRESSED_BYTES = 512 * 1024  # a body over this without Content-Encoding
CACHE_HEADERS_BYTES = 64 * 1024  # a GET body over this without Cache-Control or ETag


def _header_names(headers: Any) -> set[bytes]:
    names: set[bytes] = set()
    for item in headers or ():
        name = item[0]
        names.add(name.lower() if isinstance(name, bytes) else str(name).lower().encode())
    return names


def endpoint_location(endpoint: Any) -> str | None:
    """ "path:line" where a route's handler is defined (its first decorator, if any)."""
    if endpoint is None:
        return None
    try:
        function = inspect.unwrap(endpoint)
        if inspect.isclass(function):  # a Starlette HTTPEndpoint: the class statement
            filename = inspect.getsourcefile(function)
            line = inspect.getsourcelines(function)[1] if filename else None
            return format_location(filename, line) if filename and line else None
        code = getattr(function, "__code__", None)
        if code is None:
            code = getattr(type(function).__call__, "__code__", None)  # a callable instance
        return None if code is None else format_location(code.co_filename, code.co_firstlineno)
    except (OSError, TypeError, ValueError):
        return None


def detect(record: RequestRecord, settings: Settings) -> list[Finding]:
    size = record.response_bytes
    names = _header_names(record.response_headers)
    problems = []
    if size > UNCOMPRESSED_BYTES and b"content-encoding" not in names:
        problems.append("uncompressed")
    if (
        record.method == "GET"
        and size > CACHE_HEADERS_BYTES
        and b"cache-control" not in names
        and b"etag" not in names
    ):
        problems.append("no_cache_headers")
    if not problems:
        return []
    return [
        Finding(
            "large_response",
            record.route,
            endpoint_location(record.endpoint),
            record.duration_seconds or 0.0,
            {"bytes": size, "problems": problems, "method": record.method},
        )
    ]
