"""perfmw: runtime performance instrumentation for Starlette/FastAPI services on MongoDB.

import perfmw
perfmw.instrument(app)
"""

from __future__ import annotations

from . import dashboard as dashboard  # registers the stall chart's hook on Perf
from . import loop as loop  # registers the loop monitor's hooks on Perf
from . import testing
from .cache import watch_cache
from .exporters.otlp import configure_tracing
from .middleware import PerfMiddleware
from .mongo import mongo_listeners
from .perf import Perf, instrument, track
from .record import RequestRecord, current_request
from .settings import Settings


def __getattr__(name: str) -> str:
    """`perfmw.__version__`: the installed distribution's, read when first asked for."""
    if name != "__version__":
        raise AttributeError(f"module 'perfmw' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("perfmw")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found


__all__ = [
    "Perf",
    "PerfMiddleware",
    "RequestRecord",
    "Settings",
    "configure_tracing",
    "current_request",
    "instrument",
    "mongo_listeners",
    "testing",
    "track",
    "watch_cache",
]
