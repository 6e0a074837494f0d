"""Findings: what a detector concluded, and the bounded store that aggregates them per site.

A detector returns one `Finding` per problem seen in one request (count 1). The store merges
findings with the same (kind, route, location, shape) into one entry whose `count` and
`total_seconds` grow, keeping the most recent `detail` (but for its ADDITIVE keys, which grow
too). `merge` does the same for the findings several processes serialized (the workers of a
service, every scrape of a report).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

KINDS = (
    "n_plus_one",
    "duplicate_read",
    "consecutive_queries",
    "slow_query",
    "missing_index",
    "unbounded_read",
    "loop_stall",
    "blocking_call",
    "large_response",
)

DEFAULT_MAX_FINDINGS = 1000
#: Detail keys summed over observations, as `total_seconds` is: a loop stall's other requests'
#: wait for the loop (`delayed_seconds`).
ADDITIVE = ("delayed_seconds",)


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


def finding_key(finding: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies a serialized finding's site: (kind, route, location, shape)."""
    detail = finding.get("detail") or {}
    shape = detail.get("shape") if isinstance(detail, Mapping) else None
    return (finding.get("kind"), finding.get("route"), finding.get("location"), shape)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _latest_detail(latest: Any, earlier: Any, sign: int = 1) -> Any:
    """The latest observation's detail, with the ADDITIVE keys of both added up (with
    `sign=-1`, the growth of those keys since `earlier`)."""
    if not isinstance(latest, Mapping) or not isinstance(earlier, Mapping):
        return latest
    detail = dict(latest)
    for key in ADDITIVE:
        if key in detail or key in earlier:
            detail[key] = _number(detail.get(key)) + sign * _number(earlier.get(key))
    return detail


def detail_since(detail: Any, earlier: Any) -> Any:
    """A site's detail now, its ADDITIVE keys less what they held at an earlier snapshot."""
    return _latest_detail(detail, earlier, -1)


def merge(
    lists: Iterable[Iterable[Mapping[str, Any]]], max_findings: int | None = None
) -> list[dict[str, Any]]:
    """Serialized findings of several processes as one store would hold them: the same site's
    counts and time summed, the latest example kept (the most recently seen), at most
    `max_findings` sites (the least recently seen go), most costly first."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for findings in lists:
        for finding in findings:
            key = finding_key(finding)
            entry = merged.get(key)
            if entry is None:
                merged[key] = dict(finding)
                continue
            entry["count"] = _number(entry.get("count")) + _number(finding.get("count"))
            entry["total_seconds"] = _number(entry.get("total_seconds")) + _number(
                finding.get("total_seconds")
            )
            entry["first_seen"] = min(
                _number(entry.get("first_seen")), _number(finding.get("first_seen"))
            )
            if _number(finding.get("last_seen")) >= _number(entry.get("last_seen")):
                entry["last_seen"] = finding.get("last_seen", 0)
                entry["detail"] = _latest_detail(finding.get("detail"), entry.get("detail"))
                entry["via"] = finding.get("via") or entry.get("via")
            else:
                entry["detail"] = _latest_detail(entry.get("detail"), finding.get("detail"))
    found = list(merged.values())
    for entry in found:
        if isinstance(entry.get("count"), float) and float(entry["count"]).is_integer():
            entry["count"] = int(entry["count"])
    if max_findings is not None and len(found) > max_findings:
        found.sort(key=lambda f: -_number(f.get("last_seen")))
        del found[max_findings:]
    return sorted(found, key=lambda f: -_number(f.get("total_seconds")))


class FindingsStore:
    """The most recent findings per (kind, route, location, shape), at most `max_findings`."""

    def __init__(self, max_findings: int = DEFAULT_MAX_FINDINGS) -> None:
        if max_findings < 1:
            raise ValueError(f"max_findings must be >= 1, got {max_findings!r}")
        self.max_findings = max_findings
        self._entries: OrderedDict[tuple[str, str, str | None, str | None], Finding] = OrderedDict()
        self._lock = threading.Lock()
        self.version = 0  # grows with every change: a copy of the store knows when it is stale

    def add(self, finding: Finding) -> Finding:
        """Merge one observation; returns the stored entry."""
        key = finding.key
        with self._lock:
            self.version += 1
            entry = self._entries.get(key)
            if entry is None:
                entry = replace(finding, detail=dict(finding.detail))
                self._entries[key] = entry
                if len(self._entries) > self.max_findings:
                    self._entries.popitem(last=False)  # the least recently seen goes
            else:
                entry.count += finding.count
                entry.total_seconds += finding.total_seconds
                entry.detail = _latest_detail(finding.detail, entry.detail)
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
            self.version += 1
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.version += 1

    def __len__(self) -> int:
        return len(self._entries)
