"""Findings: what a detector concluded, and the bounded store that aggregates them per site.

A detector returns one `Finding` per problem seen in one request (count 1). The store merges
findings with the same (kind, route, location, shape) into one entry whose `count` and
`total_seconds` grow, keeping the most recent `detail`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

KINDS = (
    "n_plus_one",
    "consecutive_queries",
    "slow_query",
    "missing_index",
    "unbounded_read",
    "loop_stall",
    "blocking_call",
    "large_response",
)

DEFAULT_MAX_FINDINGS = 1000


@dataclass(slots=True, eq=False)
class Finding:
    kind: str
    route: str
    location: str | None
    total_seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    count: int = 1
    first_seen: float = field(default_factory=time.time)
    last_seen: float = 0.0
    via: str | None = None  # the library function `location` called ("argon2.low_level.verify")

    def __post_init__(self) -> None:
        if not self.last_seen:
            self.last_seen = self.first_seen

    @property
    def key(self) -> tuple[str, str, str | None, str | None]:
        return (self.kind, self.route, self.location, self.detail.get("shape"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "route": self.route,
            "count": self.count,
            "total_seconds": self.total_seconds,
            "location": self.location,
            "via": self.via,
            "detail": dict(self.detail),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


class FindingsStore:
    """The most recent findings per (kind, route, location, shape), at most `max_findings`."""

    def __init__(self, max_findings: int = DEFAULT_MAX_FINDINGS) -> None:
        if max_findings < 1:
            raise ValueError(f"max_findings must be >= 1, got {max_findings!r}")
        self.max_findings = max_findings
        self._entries: OrderedDict[tuple[str, str, str | None, str | None], Finding] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, finding: Finding) -> Finding:
        """Merge one observation; returns the stored entry."""
        key = finding.key
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = replace(finding, detail=dict(finding.detail))
                self._entries[key] = entry
                if len(self._entries) > self.max_findings:
                    self._entries.popitem(last=False)  # the least recently seen goes
            else:
                entry.count += finding.count
                entry.total_seconds += finding.total_seconds
                entry.detail = dict(finding.detail)
                entry.last_seen = finding.last_seen
                entry.via = finding.via or entry.via
                self._entries.move_to_end(key)
            return entry

    def snapshot(self) -> list[Finding]:
        """Copies of the stored findings, most costly (total_seconds) first."""
        with self._lock:
            entries = [replace(f, detail=dict(f.detail)) for f in self._entries.values()]
        entries.sort(key=lambda f: f.total_seconds, reverse=True)
        return entries

    def discard(self, kind: str, shape: str) -> int:
        """Forget the findings of one kind about one query shape (its cause was fixed)."""
        with self._lock:
            keys = [key for key in self._entries if key[0] == kind and key[3] == shape]
            for key in keys:
                del self._entries[key]
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
