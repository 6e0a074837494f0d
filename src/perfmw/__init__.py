"""perfmw: runtime performance instrumentation for Starlette/FastAPI services on MongoDB.

    import perfmw
    perfmw.instrument(app)
"""

from __future__ import annotations

from .middleware import PerfMiddleware
from .perf import Perf, instrument, track
from .record import RequestRecord, current_request
from .settings import Settings

__all__ = [
    "Perf",
    "PerfMiddleware",
    "RequestRecord",
    "Settings",
    "current_request",
    "instrument",
    "track",
]
