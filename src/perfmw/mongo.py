"""The MongoDB source: pymongo command and connection-pool listeners.

    perfmw.instrument(app)                                   # registers them process-wide
    MongoClient(uri, event_listeners=perfmw.mongo_listeners())   # a client made before that

Each application command becomes a `Query` on the current request's record (AsyncMongoClient
runs in the request's task, motor and Starlette's threadpool copy the request's context into
their threads) and one observation of `db_client_operation_duration_seconds`. Driver
housekeeping is ignored; a getMore adds its time and documents to the query that opened the
cursor. A client that has these listeners twice (process-wide and `mongo_listeners()`) sees
every event twice: the in-flight table and the per-connection states make the second a no-op.

The stack is read for the first query of each shape in a request, and when a finding needs a
location: from the Nth repetition of a shape on, for a slow query, for a read that follows
another read on a different collection, for a read sent again with the same values, and for a
sync command on the event loop's thread. Reads' values are compared by hash only
(_value_hashes.py). Everything here is guarded (`_guard`) as the component "mongo".
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
import weakref
from asyncio.events import _get_running_loop
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import timedelta
from operator import attrgetter
from os.path import dirname
from types import FrameType
from typing import Any

from prometheus_client.metrics_core import Metric
from pymongo import monitoring

from . import _frames, _guard, explain
from ._value_hashes import filter_hashes, read_hash, reply_hashes
from .detectors.mongo import REPLY_HASH_MIN_SECONDS, UNBOUNDED_BYTES, UNBOUNDED_DOCUMENTS
from .exporters._families import gauge_from
from .exporters.prometheus import PrometheusSink, live_sinks
from .loop import sockets
from .loop.requests import not_started
from .record import BlockingCall, Query, RequestRecord, _current, after_response
from .settings import Settings
from .shapes import shape_of

_GUARD = _guard.guard("mongo")

#: Commands the driver sends for itself: never counted as the application's queries.
HOUSEKEEPING = frozenset(
    {
        "hello",
        "isMaster",
        "ismaster",
        "ping",
        "buildInfo",
        "buildinfo",
        "endSessions",
        "killCursors",
        "saslStart",
        "saslContinue",
        "authenticate",
        "getnonce",
    }
)
#: Commands that only read (candidates for consecutive_queries).
READS = frozenset({"find", "aggregate", "count", "distinct"})
_INDEX_COMMANDS = frozenset({"createIndexes", "dropIndexes", "deleteIndexes"})
_MAX_INFLIGHT = 100_000
_MAX_CURSORS = 10_000
_DEFAULT_SETTINGS = Settings()
_new_query = object.__new__

# True in perfmw's own threads (explain): their commands are not the application's.
_internal: ContextVar[bool] = ContextVar("perfmw_mongo_internal", default=False)
# Open assertions of perfmw.testing.assert_max_queries: each gets every application command.
_watchers: list[list[Query]] = []
# When the current operation asked the pool for a connection (read by the command's start).
_checkout_started: ContextVar[float] = ContextVar("perfmw_checkout_started", default=0.0)


class _Extra:
    """What a few commands carry between started and succeeded (most carry nothing)."""

    __slots__ = ("blocking", "command", "cursor")

    def __init__(self) -> None:
        self.blocking: BlockingCall | None = None
        self.command: Any = None  # kept only when a slow query may need an explain
        self.cursor: Any = None  # a getMore's cursor id


# (request id, server address) -> (record, query, operation, collection, extra)
_Pending = tuple[RequestRecord | None, Query | None, str, str, "_Extra | None"]
_inflight: dict[tuple[int, Any], _Pending] = {}
_cursors: dict[tuple[Any, Any], Query] = {}  # (cursor id, server address) -> opening query


# Where the application is.


def _place(query: Query, frame: FrameType | None, in_loop: bool = False) -> None:
    """Locate `query` at the application's call site for the command being published.

    Motor runs pymongo in a worker thread whose stack holds no application frame; the frame is
    a coroutine suspended on the loop, found through the future the worker is completing.
    """
    site = _frames.call_site(frame, in_loop)
    if site[0] is None:
        site = _suspended_location(in_loop) or site
    query.location, query.via, chain = site
    if chain:
        query.loop = chain


def _executor_future() -> Any:
    """The asyncio future a concurrent.futures worker on this thread will complete, if any."""
    import concurrent.futures.thread as cf_thread

    run_code = cf_thread._WorkItem.run.__code__
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code is not run_code:
        frame = frame.f_back
    if frame is None:
        return None
    work = frame.f_locals.get("self")
    for callback in getattr(getattr(work, "future", None), "_done_callbacks", ()):
        for value in _held_by(callback):
            if isinstance(value, asyncio.Future):
                return value
    return None


def _held_by(callback: Any) -> Iterator[Any]:
    """What a future's done callback holds: its closure, and a functools.partial's arguments
    (motor chains its futures with `partial(loop.call_soon_threadsafe, callback, *args)`)."""
    for _depth in range(3):
        for cell in getattr(callback, "__closure__", None) or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                continue
        if not isinstance(callback, functools.partial):
            return
        yield from callback.args
        callback = callback.args[0] if callback.args else callback.func


def _awaiting(future: asyncio.Future[Any]) -> set[int]:
    """The future and those waiting on it (asyncio.gather, shield...), a few levels deep."""
    seen = {id(future)}
    todo = [future]
    while todo and len(seen) < 16:
        for callback, _context in getattr(todo.pop(), "_callbacks", None) or ():
            for value in _held_by(callback):
                if isinstance(value, asyncio.Future) and id(value) not in seen:
                    seen.add(id(value))
                    todo.append(value)
    return seen


def _suspended_location(in_loop: bool = False) -> _frames.CallSite | None:
    """The line awaiting this command in another task: motor's worker threads, gather's tasks."""
    future: Any = _executor_future()
    attempts = 5
    if future is None:
        loop = _get_running_loop()
        future = asyncio.current_task(loop) if loop is not None else None
        attempts = 1  # on the loop's thread: never wait
    if future is None:
        return None
    loop = future.get_loop()
    for attempt in range(attempts):
        # The awaiting task may not have reached its `await` yet when a worker starts.
        found = _awaiting_task(loop, future)
        for _level in range(4):
            if found is None:
                break
            site = _coroutine_location(found.get_coro(), in_loop)
            if site is not None:
                return site
            found = _awaiting_task(loop, found)  # a task awaiting a task awaiting us
        if attempt + 1 < attempts:
            time.sleep(0.0005 * (attempt + 1))
    return None


def _awaiting_task(loop: asyncio.AbstractEventLoop, future: Any) -> Any:
    waited = _awaiting(future)
    try:
        tasks = asyncio.all_tasks(loop)
    except RuntimeError:  # the set changed under us (another thread): give up this time
        return None
    for task in tasks:
        if task is not future and id(getattr(task, "_fut_waiter", None)) in waited:
            return task
    return None


def _coroutine_location(coro: Any, in_loop: bool = False) -> _frames.CallSite | None:
    """The call site in a suspended chain of coroutines (its innermost application frame)."""
    frames: list[FrameType] = []
    while coro is not None and len(frames) < 64:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    site = _frames.chain_site(frames, in_loop)
    return site if site.location is not None else None


# Sync pymongo on the event loop's thread.

_SYNC, _ASYNC, _NEUTRAL = 1, 2, 0
# File name -> which driver its code is (a file name keeps its own hash). Bounded: code made
# at run time (exec) passes by too.
_driver_files: dict[str, int] = {}
_MAX_DRIVER_FILES = 10_000


def _driver_folders() -> tuple[str, str | None]:
    """The folders of pymongo's synchronous and asynchronous code, found by importing them.

    From pymongo 4.9 each has its package (shared modules such as monitoring.py stay neutral);
    before it there is no asynchronous driver, and every module of pymongo is synchronous.
    """
    try:
        import pymongo.asynchronous
        import pymongo.synchronous
    except ImportError:
        import pymongo

        return dirname(pymongo.__file__ or ""), None
    return (
        dirname(pymongo.synchronous.__file__ or ""),
        dirname(pymongo.asynchronous.__file__ or ""),
    )


_SYNC_FOLDER, _ASYNC_FOLDER = _driver_folders()


def _classify(filename: str) -> int:
    folder = dirname(filename)
    if folder == _SYNC_FOLDER:
        return _SYNC
    if folder == _ASYNC_FOLDER:
        return _ASYNC
    return _NEUTRAL


def _from_sync_driver(frame: FrameType | None) -> bool:
    """Whether the command being published comes from pymongo's synchronous code path."""
    for _ in range(12):
        if frame is None:
            return False
        filename = frame.f_code.co_filename
        kind = _driver_files.get(filename)
        if kind is None:
            kind = _frames.remember(_driver_files, filename, _classify(filename), _MAX_DRIVER_FILES)
        if kind:
            return kind == _SYNC
        frame = frame.f_back
    return False


# The command listener.

_STARTED_FIELDS = ("command_name", "request_id", "connection_id", "command", "database_name")
_SUCCEEDED_FIELDS = ("request_id", "connection_id", "duration_micros", "reply")
# The private slots behind those properties (pymongo 4.9 and later; earlier ones keep the
# database elsewhere): a property is a Python call per field, about a tenth of the listener's
# time. `_started` and `_finished` read the slots by name, inline: an attrgetter of them costs
# four times as much.
_STARTED_SLOTS = (
    "_CommandEvent__cmd_name",
    "_CommandEvent__rqst_id",
    "_CommandEvent__conn_id",
    "_CommandStartedEvent__cmd",
    "_CommandEvent__db",
)
_SUCCEEDED_SLOTS = (
    "_CommandEvent__rqst_id",
    "_CommandEvent__conn_id",
    "_CommandSucceededEvent__duration_micros",
    "_CommandSucceededEvent__reply",
)
# Through the properties, where the slots do not hold the fields.
_started_fields = attrgetter(*_STARTED_FIELDS)
_succeeded_fields = attrgetter(*_SUCCEEDED_FIELDS)


def _slots_hold_fields() -> bool:
    """Whether this pymongo's events hold their fields in those slots (checked on two events
    made here)."""
    try:
        started = monitoring.CommandStartedEvent({"find": "c"}, "db", 7, ("h", 1), 9)
        succeeded = monitoring.CommandSucceededEvent(
            timedelta(microseconds=3), {"ok": 1}, "find", 7, ("h", 1), 9
        )
        checks = (
            (started, _STARTED_SLOTS, _started_fields),
            (succeeded, _SUCCEEDED_SLOTS, _succeeded_fields),
        )
        for event, slots, public in checks:
            if not all(
                a is b for a, b in zip(attrgetter(*slots)(event), public(event), strict=True)
            ):
                return False
    except (AttributeError, TypeError, ValueError):
        return False
    return True


_SLOTTED = _slots_hold_fields()


_BOUNDING_STAGES = frozenset({"$limit", "$count", "$group"})
_PROJECTING_STAGES = frozenset(
    {"$project", "$unset", "$group", "$count", "$replaceRoot", "$replaceWith"}
)


_aggregate_bounds: dict[str, tuple[bool, bool]] = {}  # shape -> (has limit, has projection)


def _aggregate_limits(command: Any, query: Query) -> None:
    bounds = _aggregate_bounds.get(query.shape)
    if bounds is None:
        pipeline = command.get("pipeline")
        stages = {next(iter(stage), "") for stage in pipeline if stage} if pipeline else set()
        bounds = (
            not _BOUNDING_STAGES.isdisjoint(stages),
            not _PROJECTING_STAGES.isdisjoint(stages),
        )
        if len(_aggregate_bounds) < 10_000:
            _aggregate_bounds[query.shape] = bounds
    query.has_limit, query.has_projection = bounds


# Bytes of one document per shape, from a reply's first document: encoding it costs more than
# the rest of the listener (decoded replies carry no size), so it is measured again only every
# _REMEASURE-th batch of the shape, or when the batch may be large enough to matter.
_document_bytes: dict[str, list[int]] = {}  # shape -> [bytes, batches estimated since]
_REMEASURE = 32
_MAX_SIZED_SHAPES = 10_000


def _batch_bytes(shape: str, batch: list[Any]) -> int:
    """Bytes of a reply batch, estimated from a document of it (raw ones carry their own).

    Only batches of several documents are measured: a single document (find_one) is bounded.
    """
    first = batch[0]
    if type(first) is not dict:
        raw = getattr(first, "raw", None)
        if raw is not None:
            return len(raw) * len(batch)
    known = _document_bytes.get(shape)
    if known is not None:
        estimate = known[0] * len(batch)
        if known[1] < _REMEASURE and estimate * 4 < UNBOUNDED_BYTES:
            known[1] += 1
            return estimate
    import bson

    size = len(bson.encode(first))
    if len(_document_bytes) >= _MAX_SIZED_SHAPES:
        _document_bytes.clear()
    _document_bytes[shape] = [size, 0]
    return size * len(batch)


def _unbounded(query: Query) -> bool:
    return query.documents > UNBOUNDED_DOCUMENTS or query.reply_bytes > UNBOUNDED_BYTES


#: Reads hashed per record for duplicate_read (a request sending more reads is not tracked
#: further: its later reads are compared with these only).
MAX_READ_HASHES = 1000


def _compare(record: RequestRecord, query: Query, hashed: int) -> None:
    seen = record.read_hashes
    if seen is None:  # a shape read again: from now on the request's reads are in a set
        seen = record.read_hashes = set()
        for earlier in record.queries[:MAX_READ_HASHES]:
            if earlier.values_hash is not None and earlier is not query:
                seen.add(earlier.values_hash)
    if hashed in seen:  # the same read again: duplicate_read needs its line (the first
        if query.location is None:  # one's, as the first of its shape, is known)
            _place(query, sys._getframe(2))
    elif len(seen) < MAX_READ_HASHES:
        seen.add(hashed)


def _started(event: monitoring.CommandStartedEvent) -> None:
    """A command sent: the listener's `started` (pymongo calls this function itself)."""
    try:
        if _SLOTTED:
            fields: Any = event
            name = fields._CommandEvent__cmd_name
            request_id = fields._CommandEvent__rqst_id
            connection_id = fields._CommandEvent__conn_id
            command = fields._CommandStartedEvent__cmd
            database = fields._CommandEvent__db
        else:
            name, request_id, connection_id, command, database = _started_fields(event)
        if name in HOUSEKEEPING:
            return
        key = (request_id, connection_id)
        if key in _inflight:
            return  # the same event again: this client has perfmw's listeners twice
        record = _current.get()
        if record is not None and record.closed:
            record = after_response(record)
        if record is None and _internal.get():
            return
        if name == "getMore":
            cursor = command.get("getMore")
            opened = _cursors.get((cursor, connection_id))
            collection = command.get("collection")
            more = _Extra()
            more.cursor = cursor
            _inflight[key] = (
                record,
                opened,
                name,
                collection if type(collection) is str else "",
                more,
            )
            return
        collection = command.get(name)
        if type(collection) is not str:
            collection = ""
        if record is None and not _watchers:
            _inflight[key] = (None, None, name, collection, None)
            return
        owner = None if record is None else record.owner
        settings = _DEFAULT_SETTINGS if owner is None else owner.settings
        shape = shape_of(name, command, False, database)
        # The query began when the application asked for a connection (concurrent operations
        # that queue for the pool or a new connection still began together).
        began = _checkout_started.get()
        if began:
            _checkout_started.set(0.0)
        else:
            began = time.perf_counter()
        query = _new_query(Query)  # the other fields are their class-level defaults
        query.operation = name
        query.collection = collection
        query.database = database
        query.shape = shape
        query.duration_seconds = 0.0
        query.started_at = began
        if name == "find":  # both default to True
            if not command.get("limit"):
                query.has_limit = False
            if not command.get("projection"):
                query.has_projection = False
        elif name == "aggregate":
            _aggregate_limits(command, query)
        extra: _Extra | None = None
        if settings.explain_slow_queries:
            extra = _Extra()
            extra.command = command
        _inflight[key] = (record, query, name, collection, extra)
        if len(_inflight) > _MAX_INFLIGHT:  # replies that never came (a dead connection)
            _inflight.pop(next(iter(_inflight)))
        if record is not None:
            queries = record.queries
            previous = queries[-1] if queries else None
            queries.append(query)
            counts = record.shape_counts
            repeated = counts.get(shape, 0) + 1
            counts[shape] = repeated
            read = name in READS
            # A read after a finished read elsewhere: it may continue a consecutive_queries run.
            continues = (
                read
                and previous is not None
                and previous.collection != collection
                and previous.operation in READS
                and previous.finished_at
            )
            if extra is not None:  # explain_slow_queries: missing indexes get their location
                verdict = explain.state(shape)
                if verdict == explain.MISSING:
                    _place(query, sys._getframe(1))
                elif verdict == explain.REPEATED:
                    _place(query, sys._getframe(1))
                    _explain(query, command, sys._getframe(1))
            # Located: the first of each shape (what `current_request().queries` show) and each
            # one from the Nth on (the N+1's); those in between cost no stack walk.
            if repeated == 1 or repeated >= settings.n_plus_one_threshold:
                if query.location is None:
                    _place(query, sys._getframe(1), True)
            elif continues:
                _place(query, sys._getframe(1))
            if read:  # its values, as hashes (see _value_hashes)
                hashed = read_hash(name, command, shape)
                if hashed is not None:
                    query.values_hash = hashed
                    # The hash includes the shape: the first read of a shape has no twin.
                    if repeated > 1 or record.read_hashes is not None:
                        _compare(record, query, hashed)  # a second read with the same values?
                if continues:  # does it filter on what an earlier read returned?
                    query.filter_hashes = filter_hashes(name, command)
            loop = _get_running_loop()
            if loop is not None:
                if _from_sync_driver(sys._getframe(1)):
                    _blocking_call(record, query, key, name, collection)
                else:
                    query.on_loop = loop  # its reply is read by the loop: a stall delays it
        if _watchers:
            if query.location is None:
                _place(query, sys._getframe(1))
            for watcher in list(_watchers):
                watcher.append(query)
    except Exception as exc:  # a `try`: `with _GUARD` costs 0.1 µs per event
        _guard.swallowed("mongo", exc)


def _blocking_call(
    record: RequestRecord, query: Query, key: tuple[int, Any], name: str, collection: str
) -> None:
    """A sync pymongo command on the loop's thread: the loop waits for the network."""
    if query.location is None:
        _place(query, sys._getframe(2))
    call = BlockingCall(
        "pymongo-sync",
        query.location,
        0.0,
        {"operation": name, "collection": collection},
        query.via,
    )
    record.blocking_calls.append(call)
    record_, query_, operation, collection_, extra = _inflight[key]
    if extra is None:
        extra = _Extra()
    extra.blocking = call
    _inflight[key] = (record_, query_, operation, collection_, extra)


#: The kernel's unread requests are read for a blocking call's site at most once per this many
#: seconds (about 6 µs per socket: more than many commands take, at every call); the calls in
#: between are given the site's latest reading, scaled to their own duration.
UNREAD_SAMPLE_SECONDS = 1.0
_MAX_UNREAD_SITES = 1024
# site -> (read at, requests unread, their wait per second of the call), the latest reading
_unread_sites: dict[str | None, tuple[float, int, float]] = {}


def _unread(site: str | None, seconds: float) -> tuple[int, float]:
    """The requests a sync call at `site` kept unread in their connections (the loop reads none
    while it waits for the reply), and their wait within the call's `seconds`, as of now."""
    now = time.perf_counter()
    known = _unread_sites.get(site)
    if known is not None and now - known[0] < UNREAD_SAMPLE_SECONDS:
        return known[1], known[2] * seconds
    waits = sockets.waits(sockets.arrivals(now), now - seconds, now)
    waited = sum(waits)
    rate = waited / seconds if seconds > 0 else 0.0
    _frames.remember(_unread_sites, site, (now, len(waits), rate), _MAX_UNREAD_SITES)
    return len(waits), waited


def _finished(
    event: monitoring.CommandSucceededEvent | monitoring.CommandFailedEvent, failed: bool = False
) -> None:
    """A reply or a failure: the listener's `succeeded` (pymongo calls this function itself)
    and `failed`. Housekeeping commands were never in flight: their replies find nothing."""
    try:
        if failed:
            request_id, connection_id = event.request_id, event.connection_id
            micros, reply = event.duration_micros, None
        elif _SLOTTED:
            fields: Any = event
            request_id = fields._CommandEvent__rqst_id
            connection_id = fields._CommandEvent__conn_id
            micros = fields._CommandSucceededEvent__duration_micros
            reply = fields._CommandSucceededEvent__reply
        else:
            request_id, connection_id, micros, reply = _succeeded_fields(event)
        pending = _inflight.pop((request_id, connection_id), None)
        if pending is None:
            return
        record, query, operation, collection, extra = pending
        seconds = micros / 1_000_000
        owner = None if record is None else record.owner
        if owner is not None:
            span = record.span  # type: ignore[union-attr]
            # The trace id as the exemplar when the span is sampled (exporters/tracing.py).
            owner.sink.observe_command(
                operation, collection, seconds, None if span is None else span.exemplar
            )
        else:
            for sink in live_sinks():
                sink.observe_command(operation, collection, seconds, None)
        if extra is not None and extra.blocking is not None:
            call = extra.blocking
            call.duration_seconds = seconds
            loop = _get_running_loop()
            if record is not None and loop is not None:
                # The loop waited, and so did the other requests in flight, those the server
                # read but could not start, and those unread in their connections.
                waiting = record.others_in_flight() + not_started(loop)
                unread, unread_seconds = _unread(call.location, seconds)
                call.detail["requests_waiting"] = waiting + unread
                call.detail["delayed_seconds"] = waiting * seconds + unread_seconds
        if query is None:
            if operation in _INDEX_COMMANDS:
                _index_changed(event.database_name, collection)
            return
        cursor = reply.get("cursor") if reply is not None else None
        if operation == "getMore":
            query.duration_seconds += seconds
            query.finished_at = time.perf_counter()
            if type(cursor) is dict:
                batch = cursor.get("nextBatch")
                if batch:
                    query.documents += len(batch)
                    if not (query.has_limit and query.has_projection):
                        query.reply_bytes += _batch_bytes(query.shape, batch)
                        if query.location is None and _unbounded(query):
                            _place(query, sys._getframe(1))
                if not cursor.get("id") and extra is not None:
                    _cursors.pop((extra.cursor, connection_id), None)
            return
        query.duration_seconds = seconds
        query.finished_at = time.perf_counter()
        if reply is None:
            query.failed = True
        elif type(cursor) is dict:
            batch = cursor.get("firstBatch")
            if batch:
                query.documents = len(batch)
                if record is not None and seconds >= REPLY_HASH_MIN_SECONDS:
                    query.reply_hashes = reply_hashes(batch)
                if len(batch) > 1 and not (query.has_limit and query.has_projection):
                    query.reply_bytes = _batch_bytes(query.shape, batch)
                    if query.location is None and _unbounded(query):
                        _place(query, sys._getframe(1))
            cursor_id = cursor.get("id")
            if cursor_id:
                _cursors[(cursor_id, connection_id)] = query
                if len(_cursors) > _MAX_CURSORS:
                    _cursors.pop(next(iter(_cursors)))
        if operation in _INDEX_COMMANDS:
            _index_changed(event.database_name, collection)
        if owner is not None and seconds > owner.settings.slow_query_seconds:
            if query.location is None:
                _place(query, sys._getframe(1))
            if extra is not None and extra.command is not None:
                _explain(query, extra.command, sys._getframe(1))
    except Exception as exc:
        _guard.swallowed("mongo", exc)


class CommandListener(monitoring.CommandListener):
    """Turns each application command into a `Query` on the current record and a metric."""

    def __init__(self) -> None:
        # pymongo calls these for every command: the functions themselves, one call less each.
        vars(self).update(started=_started, succeeded=_finished)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        _started(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        _finished(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        _finished(event, failed=True)


# Missing-index advice lives in explain.py; the listener only hands it candidates.


def _explain(query: Query, command: Any, frame: FrameType | None) -> None:
    explain.consider(query, command, frame)


def _index_changed(database: str, collection: str) -> None:
    explain.invalidate(database, collection)


# The connection-pool listener.

_IDLE, _USED = 1, 2
_connections: dict[tuple[Any, int], int] = {}  # (address, connection id) -> state
_last_failure = threading.local()


_pool_names: dict[Any, str] = {}


def _pool_name(address: Any) -> str:
    """`host:port`, the pool's label (made once per address)."""
    name = _pool_names.get(address)
    if name is None:
        try:
            host, port = address
            name = f"{host}:{port}"
        except (TypeError, ValueError):
            name = str(address)
        if len(_pool_names) < 1000:
            _pool_names[address] = name
    return name


def _waited(event: Any) -> float | None:
    """The time the check-out took: the event's own duration (pymongo 4.7 and later), else the
    time since this operation's check-out-started event, published on the same thread."""
    seconds: float | None = getattr(event, "duration", None)
    if seconds is None:
        began = _checkout_started.get()
        seconds = time.perf_counter() - began if began else None
    return seconds


def _observe_wait(address: Any, seconds: float | None) -> None:
    if seconds is None:
        return
    pool = _pool_name(address)
    record = _current.get()
    owner = record.owner if record is not None and not record.closed else None
    if owner is not None:
        owner.sink.observe_pool_wait(pool, seconds)
        return
    for sink in live_sinks():
        sink.observe_pool_wait(pool, seconds)


class PoolListener(monitoring.ConnectionPoolListener):
    """Connection wait times, and used/idle connections per pool read at scrape time."""

    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None:
        return None

    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None:
        return None

    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        return None

    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None:
        return None

    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None:
        if _internal.get():
            return
        with _GUARD:
            _connections.setdefault((event.address, event.connection_id), _IDLE)

    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None:
        return None

    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        with _GUARD:
            _connections.pop((event.address, event.connection_id), None)

    # Check-out started, checked out and checked in come with every operation: each is in a
    # `try`, as the command listener's events are (`with _GUARD` costs 0.1 µs per event).

    def connection_check_out_started(
        self, event: monitoring.ConnectionCheckOutStartedEvent
    ) -> None:
        try:
            _checkout_started.set(time.perf_counter())
        except Exception as exc:
            _guard.swallowed("mongo", exc)

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent) -> None:
        if _internal.get():
            return
        with _GUARD:
            # No connection id to tell a repeat by: the same event object twice in a row is one.
            if getattr(_last_failure, "event", None) is event:
                return
            _last_failure.event = event
            _observe_wait(event.address, _waited(event))

    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        if _internal.get():
            return
        try:
            key = (event.address, event.connection_id)
            if _connections.get(key) == _USED:
                return
            _connections[key] = _USED
            _observe_wait(event.address, _waited(event))
        except Exception as exc:
            _guard.swallowed("mongo", exc)

    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None:
        try:
            key = (event.address, event.connection_id)
            if _connections.get(key) == _USED:
                _connections[key] = _IDLE
        except Exception as exc:
            _guard.swallowed("mongo", exc)


def _connection_counts() -> Iterable[tuple[tuple[str, str], float]]:
    totals: dict[str, list[int]] = {}
    for (address, _id), state in list(_connections.items()):
        counts = totals.setdefault(_pool_name(address), [0, 0])
        counts[0 if state == _USED else 1] += 1
    for pool, (used, idle) in sorted(totals.items()):
        yield (pool, "used"), float(used)
        yield (pool, "idle"), float(idle)


def connection_count_metrics() -> Iterable[Metric]:
    """`db_client_connection_count{pool,state}`, read when Prometheus scrapes."""
    yield gauge_from(
        "db_client_connection_count",
        "MongoDB connections per pool and state (used: checked out; idle: in the pool).",
        ("db_client_connection_pool_name", "db_client_connection_state"),
        _connection_counts,
    )


# Registration.

_commands = CommandListener()
_pool = PoolListener()
_register_lock = threading.Lock()
_registered = False
_sinks_with_source: weakref.WeakSet[PrometheusSink] = weakref.WeakSet()


def _add_pool_source() -> None:
    for sink in live_sinks():
        if sink not in _sinks_with_source:
            sink.add_source(connection_count_metrics)
            _sinks_with_source.add(sink)


def driver_notes() -> list[str]:
    """What the installed pymongo does not report, and what perfmw does about it."""
    import pymongo

    notes = []
    if not hasattr(monitoring.ConnectionCheckedOutEvent, "duration"):
        notes.append(
            f"pymongo {pymongo.version} reports no duration on connection pool events "
            "(added in pymongo 4.7): perfmw measures connection wait times from the "
            "check-out-started event instead"
        )
    return notes


_noted = False


def _note_driver() -> None:
    """Log the installed driver's notes once per process, when the listeners are set up."""
    global _noted
    if not _noted:
        _noted = True
        for note in driver_notes():
            _guard.logger.info("perfmw: %s", note)


def register_listeners() -> None:
    """Register the listeners process-wide (clients created from now on are observed)."""
    global _registered
    with _register_lock:
        _note_driver()
        if not _registered:
            monitoring.register(_commands)
            monitoring.register(_pool)
            _registered = True
            explain.register()
        _add_pool_source()


def mongo_listeners() -> list[monitoring.CommandListener | monitoring.ConnectionPoolListener]:
    """The listeners for a client created before `instrument()`: `event_listeners=...`.

    client = MongoClient(uri, event_listeners=perfmw.mongo_listeners())
    """
    with _register_lock:
        _note_driver()
        explain.register()
        _add_pool_source()
    return [_commands, _pool]
