"""Log sink: one WARNING per finding site, at most once a minute per site.

The application's strings (routes, locations, shapes, stack frames) are written on one line each
(`visible`): a route holding a line break cannot forge a log line of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from .._report_escape import visible
from ..findings import Finding

logger = logging.getLogger("perfmw")

LOG_INTERVAL_SECONDS = 60.0
_MAX_SITES = 2000
_last_logged: OrderedDict[tuple[str, str, str | None], float] = OrderedDict()
_lock = threading.Lock()


def _due(finding: Finding, now: float) -> bool:
    site = (finding.kind, finding.route, finding.location)
    with _lock:
        last = _last_logged.get(site)
        if last is not None and now - last < LOG_INTERVAL_SECONDS:
            return False
        _last_logged[site] = now
        _last_logged.move_to_end(site)
        if len(_last_logged) > _MAX_SITES:
            _last_logged.popitem(last=False)
        return True


def _ms(seconds: object) -> str:
    return f"{float(seconds) * 1000:.0f} ms" if isinstance(seconds, (int, float)) else "? ms"


def describe(finding: Finding) -> str:
    """One sentence a person can act on (a stall's stack follows on the next lines)."""
    d = finding.detail
    route = visible(finding.route)
    where = visible(finding.location or "unknown location")
    if finding.via:
        where += f" via {visible(finding.via)}"
    on = visible(f"{d.get('operation', '?')} on {d.get('collection', '?')}")
    kind = finding.kind
    if kind == "n_plus_one":
        return f"N+1 queries on {route}: {on} repeated {d.get('repetitions')} times at {where}"
    if kind == "duplicate_read":
        first = d.get("first_location")
        earlier = f"first at {visible(str(first))}" if first else "first at an earlier line"
        return (
            f"duplicate read on {route}: {on} sent {d.get('repetitions')} times with the same "
            f"values, again at {where} ({earlier}): read it once and pass it down"
        )
    if kind == "loop_stall":
        stack = "\n    ".join(visible(str(frame)) for frame in d.get("stack", ())[-10:])
        return (
            f"event loop stalled {_ms(d.get('duration_seconds', 0))} ({d.get('cause')}) on "
            f"{route}{_others_waiting(d)} at {where}\n    {stack}"
        )
    if kind == "slow_query":
        behind = d.get("loop_stall_seconds")
        waited = f", {_ms(behind)} of it waiting for a stalled event loop" if behind else ""
        return (
            f"slow query on {route}: {on} took {_ms(d.get('duration_seconds'))}{waited} at {where}"
        )
    if kind == "consecutive_queries":
        collections = visible(", ".join(str(c) for c in d.get("collections", ())))
        return (
            f"independent queries awaited one after another on {route} ({collections}) "
            f"at {where}: running them concurrently would save {_ms(d.get('saving_seconds'))}"
        )
    if kind == "missing_index":
        keys = ", ".join(f"{k}: {v}" for k, v in d.get("index") or ())
        return (
            f"missing index on {route}: {on} scans the collection at {where}; "
            f"an index {{{keys}}} would serve it"
        )
    if kind == "unbounded_read":
        missing = " and ".join(str(m) for m in d.get("missing", ()))
        return (
            f"unbounded read on {route}: {on} returned {d.get('documents')} documents "
            f"with no {missing} at {where}"
        )
    if kind == "blocking_call":
        return (
            f"blocking call on {route}: {d.get('kind')} ({on}) on the event loop's "
            f"thread for {_ms(finding.total_seconds)}{_others_waiting(d)} at {where}"
        )
    if kind == "large_response":
        problems = " and ".join(str(p).replace("_", " ") for p in d.get("problems", ()))
        return f"large response on {route}: {d.get('bytes')} bytes ({problems}) from {where}"
    return f"{visible(kind)} on {route} at {where} ({_ms(finding.total_seconds)})"


def _others_waiting(detail: Mapping[str, Any]) -> str:
    """The clause ", 3 other requests waiting," when the latest stall or call held any up."""
    waiting = detail.get("requests_waiting")
    plural = "s" if waiting != 1 else ""
    return f", {waiting} other request{plural} waiting," if waiting else ""


def log_findings(findings: Iterable[Finding]) -> None:
    now = time.monotonic()
    for finding in findings:
        if _due(finding, now):
            logger.warning("perfmw: %s", describe(finding))
