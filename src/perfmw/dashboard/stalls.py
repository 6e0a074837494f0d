"""The recent stalls of each application, for the dashboard's chart: a bounded store per Perf.

Fed by a `Perf.finish` stall hook, which runs only for a record that has stalls (never on an
ordinary request's path), once the loop monitor's own hook has settled them: their whole
duration, cause and culprit are known. The monitor's hook is registered when `perfmw.loop` is
imported, which this module makes sure happens first.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any

from .. import loop  # noqa: F401  (its hook settles the stalls before this one reads them)
from .. import perf as perf_module
from ..perf import Perf
from ..record import RequestRecord

#: Stalls kept per application, the oldest dropped first.
RECENT_STALLS = 256

_lock = threading.Lock()
_stores: weakref.WeakKeyDictionary[Perf, deque[dict[str, Any]]] = weakref.WeakKeyDictionary()


def note(record: RequestRecord) -> None:
    """`Perf.finish` stall hook: keep the record's stalls, with when they began (wall clock)."""
    owner = record.owner
    if not isinstance(owner, Perf) or owner.settings.dashboard_path is None:
        return
    wall, clock = time.time(), time.perf_counter()
    points = [
        {
            # started_at is on the monitor's clock (perf_counter): the same moment on the wall.
            "at": wall - (clock - stall.started_at if stall.started_at else stall.duration_seconds),
            "duration_seconds": stall.duration_seconds,
            "cause": stall.cause,
            "route": record.route,
            "location": stall.location,
        }
        for stall in record.stalls
    ]
    with _lock:
        store = _stores.get(owner)
        if store is None:
            store = _stores[owner] = deque(maxlen=RECENT_STALLS)
        store.extend(points)


def recent(perf: Perf) -> list[dict[str, Any]]:
    """The application's last RECENT_STALLS stalls, oldest first."""
    with _lock:
        return list(_stores.get(perf, ()))


perf_module._stall_hooks.append(note)
