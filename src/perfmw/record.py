"""The per-request record: what sources append to and what detectors and sinks read.

One `RequestRecord` per HTTP request (opened by the middleware) or per `perfmw.track()` block,
held in a ContextVar so that code running for the request (tasks, threadpool workers, motor's
threads) finds it with `current_request()`.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .findings import Finding
    from .loop.causes import Signals

BACKGROUND = "<background>"
UNMATCHED = "<unmatched>"
OTHER = "<other>"

#: A stall's cause (loop/causes.py decides it): the code's, or the machine's, which is counted
#: and never a finding.
CODE_CAUSES = ("blocking", "cpu", "gc", "saturation")
MACHINE_CAUSES = ("starved", "throttled")
CAUSES = CODE_CAUSES + MACHINE_CAUSES


@dataclass(eq=False)
class Query:
    """One MongoDB command sent by the application (getMores fold into the query they continue).

    Not slotted: its defaults are class attributes, so the listener makes one by setting the
    six fields a starting command has (mongo.py), a third of what `__init__` costs.
    """

    operation: str
    collection: str
    database: str
    shape: str
    duration_seconds: float
    location: str | None = None
    started_at: float = 0.0  # time.perf_counter() at command start
    finished_at: float = 0.0  # time.perf_counter() at the last reply (getMores included)
    documents: int = 0  # documents returned, getMores included
    reply_bytes: int = 0
    has_limit: bool = True
    has_projection: bool = True
    failed: bool = False
    # The event loop that awaited the reply (None: sent from a thread), and how long of the
    # query that loop was stalled: a reply that arrives during a stall waits for the loop.
    on_loop: Any = None
    stall_seconds: float = 0.0
    via: str | None = None  # the library function the application's line called
    # The application's lines from the one inside a loop down to `location` (outermost first),
    # read for the queries an N+1 is judged on; () when no application line loops.
    loop: tuple[str, ...] = ()
    # Hashes of values, never the values (see mongo.py): of the shape and every value that
    # decides the result (a read sent twice with the same values has the same one), of the
    # filter's values (only for a read that may continue a consecutive run), and of the
    # reply's first documents (only a small reply).
    values_hash: int | None = None
    filter_hashes: set[int] | None = None
    reply_hashes: set[int] | None = None


@dataclass(slots=True, eq=False)
class Stall:
    """The event loop was blocked for `duration_seconds` while this request's code ran."""

    duration_seconds: float
    location: str | None
    stack: tuple[str, ...] = ()
    cause: str = "blocking"
    gc_seconds: float = 0.0  # garbage collection time within the stall
    via: str | None = None  # the library function the application's line called
    started_at: float = 0.0  # time.perf_counter() when the loop stopped answering
    signals: Signals | None = None  # what the kernel measured of the loop thread meanwhile
    # The other requests that waited for the loop: those in flight or read but not started
    # when it ended, and those sent meanwhile, unread (loop/sockets.py); their wait, in all.
    requests_waiting: int = 0
    delayed_seconds: float = 0.0


@dataclass(slots=True, eq=False)
class BlockingCall:
    """A known blocking call made on the event loop's thread (e.g. a sync pymongo command)."""

    kind: str
    location: str | None
    duration_seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    via: str | None = None


class RequestRecord:
    """Facts about one request. `db_queries` and `db_seconds` are derived from `queries`."""

    __slots__ = (
        "__weakref__",
        "background",
        "blocking_calls",
        "cache_hits",
        "cache_misses",
        "closed",
        "disconnected",
        "duration_seconds",
        "endpoint",
        "findings",
        "kind",
        "method",
        "owner",
        "path",
        "queries",
        "read_hashes",
        "response_bytes",
        "response_headers",
        "route",
        "shape_counts",
        "span",
        "stalls",
        "started_at",
        "status_code",
    )

    def __init__(
        self, route: str, method: str = "", path: str = "", kind: str = "http", owner: Any = None
    ) -> None:
        self.route = route
        self.method = method
        self.path = path
        self.kind = kind  # "http", "track" for perfmw.track(), "background" (after_response)
        self.owner = owner  # the Perf whose sinks receive this record
        self.status_code: int | None = None
        self.started_at = time.perf_counter()
        self.duration_seconds: float | None = None
        self.response_bytes = 0
        # The raw ASGI headers of the response start, read only by detectors that need them.
        self.response_headers: Any = None
        self.queries: list[Query] = []
        self.cache_hits = 0
        self.cache_misses = 0
        self.stalls: list[Stall] = []
        self.blocking_calls: list[BlockingCall] = []
        self.findings: list[Finding] = []
        self.disconnected = False
        # The handler routing chose (scope["endpoint"]), so findings about the response
        # itself can name the code that produced it.
        self.endpoint: Any = None
        self.closed = False
        self.span: Any = None
        # Queries per shape so far, kept by the MongoDB listener to spot the Nth repetition.
        self.shape_counts: dict[str, int] = {}
        # What the request's background tasks send after its response ("<route> (background)").
        self.background: RequestRecord | None = None
        # Values hashes of the reads so far, kept by the listener to spot a read sent again.
        self.read_hashes: set[int] | None = None

    @property
    def db_queries(self) -> int:
        return len(self.queries)

    @property
    def db_seconds(self) -> float:
        return sum(query.duration_seconds for query in self.queries)

    @property
    def stall_seconds(self) -> float:
        return sum(stall.duration_seconds for stall in self.stalls)

    def others_in_flight(self) -> int:
        """The requests of this record's app in flight besides it (a finished record is no
        longer counted in http_server_active_requests): those that wait while it blocks the
        loop."""
        owner = self.owner
        if owner is None:
            return 0
        active = int(sum(child.value for child in list(owner.sink.active_requests.values())))
        return max(0, active - (0 if self.closed else 1))

    def __repr__(self) -> str:
        return (
            f"<RequestRecord {self.method} {self.route} status={self.status_code} "
            f"queries={self.db_queries} duration={self.duration_seconds}>"
        )


_current: ContextVar[RequestRecord | None] = ContextVar("perfmw_request", default=None)


def after_response(record: RequestRecord) -> RequestRecord | None:
    """Where work of a finished HTTP request goes (its BackgroundTasks, run after the response):
    a record of its own, named after the route that scheduled it."""
    if record.kind != "http" or record.owner is None:
        return None
    background = record.background
    if background is None:
        background = record.background = RequestRecord(
            f"{record.route} (background)", record.method, record.path, "background", record.owner
        )
    return None if background.closed else background


def current_request() -> RequestRecord | None:
    """The record of the running request or `track()` block, or None outside one.

    A request whose response has been sent is over: its background tasks see None.
    """
    record = _current.get()
    if record is None or record.closed:
        return None
    return record
