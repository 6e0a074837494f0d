"""Detectors: pure functions from a finished record (and settings) to findings.

Each module holds the detectors of one source; `detect()` runs those that apply. A record
with nothing for a detector to look at (no queries, no stalls, a small body) costs a few
attribute reads.
"""

from __future__ import annotations

from ..findings import Finding
from ..record import RequestRecord
from ..settings import Settings
from . import http, loop, mongo


def detect(record: RequestRecord, settings: Settings) -> list[Finding]:
    found: list[Finding] = []
    if record.queries:
        found.extend(mongo.detect(record, settings))
    if record.stalls or record.blocking_calls:
        found.extend(loop.detect(record, settings))
    if record.response_bytes > http.CACHE_HEADERS_BYTES:
        found.extend(http.detect(record, settings))
    if settings.silenced_locations and found:
        found = [f for f in found if not silenced(f.location, settings.silenced_locations)]
    return found


def silenced(location: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether a finding's "path:line" is one the user accepted ("path:line" or a path suffix)."""
    if location is None:
        return False
    path = location.rpartition(":")[0]
    return any(location.endswith(p) or path.endswith(p) for p in patterns)
