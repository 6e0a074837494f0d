"""The HTTP checklist: large bodies sent uncompressed, large GETs without cache validators."""

from __future__ import annotations

from typing import Any

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
            None,
            record.duration_seconds or 0.0,
            {"bytes": size, "problems": problems, "method": record.method},
        )
    ]
