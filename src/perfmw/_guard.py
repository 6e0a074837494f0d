"""Never break the host: perfmw's own code runs under a guard that logs once and counts.

    with guard("middleware"):
        ...perfmw's work, never the application's own call...

A guarded error is logged once per site (component, exception type, raising line) on the
`perfmw` logger and counted in `perfmw_internal_errors_total{component}`. A fault of the
machine that perfmw expects (a full disk) is logged as one sentence saying what it costs, without
the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections import Counter
from types import TracebackType

logger = logging.getLogger("perfmw")

_lock = threading.Lock()
_seen_sites: set[tuple[str, str, str]] = set()
#: Errors per component since the process started; read at scrape time.
error_counts: Counter[str] = Counter()
#: Every guarded error (bounded), so the test suite can fail on unexpected ones.
recent_errors: list[tuple[str, BaseException]] = []
_RECENT_LIMIT = 100


def report_internal_error(component: str, exc: BaseException, message: str | None = None) -> None:
    """Count an internal error and log it the first time its site is seen: `message` if
    given, else the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    site = (component, type(exc).__name__, where)
    with _lock:
        error_counts[component] += 1
        if len(recent_errors) < _RECENT_LIMIT:
            recent_errors.append((component, exc))
        first = site not in _seen_sites
        if first and len(_seen_sites) < 10_000:
            _seen_sites.add(site)
    if first and message is not None:
        logger.error("perfmw: %s (logged once; the application is unaffected)", message)
    elif first:
        logger.error(
            "perfmw internal error in %s (logged once per site; the application is unaffected)",
            component,
            exc_info=exc,
        )


class guard:
    """Context manager that swallows and reports perfmw's own errors.

    Instances hold no per-use state, so one per component is made once and reused.
    """

    __slots__ = ("component",)

    def __init__(self, component: str) -> None:
        self.component = component

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # let cancellation and KeyboardInterrupt through
        swallowed(self.component, exc)
        return True


def swallowed(component: str, exc: Exception) -> None:
    """Report an error `guard` would have swallowed, for a hot path's own `try` (entering a
    `with` block costs about 0.1 µs, a `try` nothing)."""
    with contextlib.suppress(Exception):  # the reporter itself must never raise
        report_internal_error(component, exc)
