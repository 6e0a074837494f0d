"""Log sink: one WARNING per finding site, at most once a minute per site."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

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


def describe(finding: Finding) -> str:
    """One line a person can act on."""
    detail = finding.detail
    where = finding.location or "unknown location"
    if finding.kind == "n_plus_one":
        return (
            f"N+1 queries on {finding.route}: {detail.get('operation')} on "
            f"{detail.get('collection')} repeated {detail.get('repetitions')} times at {where}"
        )
    if finding.kind == "loop_stall":
        stack = "\n    ".join(detail.get("stack", ())[-10:])
        return (
            f"event loop stalled {detail.get('duration_seconds', 0) * 1000:.0f} ms "
            f"({detail.get('cause')}) on {finding.route} at {where}\n    {stack}"
        )
    seconds = f"{finding.total_seconds * 1000:.1f} ms"
    return f"{finding.kind} on {finding.route} at {where} ({seconds}): {detail}"


def log_findings(findings: Iterable[Finding]) -> None:
    now = time.monotonic()
    for finding in findings:
        if _due(finding, now):
            logger.warning("perfmw: %s", describe(finding))
