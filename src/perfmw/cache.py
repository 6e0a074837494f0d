"""Caches watched per instance: hits, misses, evictions and expiries, per cache and per request.

    servers = perfmw.watch_cache(TTLCache(maxsize=100, ttl=300), name="servers")

`watch_cache` returns a `wrapt.ObjectProxy` around the cache (cachetools classes are never
patched: their methods call each other on the cache itself, which the proxy leaves alone). Each
logical lookup counts once, as a hit or a miss; the counting rule of each idiom, and how
evictions and expiries are told apart, are in docs/caches.md. Counters are plain increments on
the proxy, read by a collector at scrape time with the cache's size.
"""

from __future__ import annotations

import contextlib
import copy
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from threading import get_ident
from typing import TYPE_CHECKING, Any, TypeVar, cast

import wrapt
from cachetools import Cache, TLRUCache, TTLCache
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._guard import guard, report_internal_error
from .exporters.prometheus import sink_for
from .record import _current

__all__ = ["watch_cache"]

C = TypeVar("C")

_GUARD = guard("cache")
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_:.-]{0,63}")
_MISSING: Any = object()
# Bounds on the per-thread bookkeeping of open lookups (threads come and go; a missed key may
# never be stored): past them the oldest entries are dropped, which can only cost an extra count.
# Misses stay open while their value is computed, so recursion as deep as this counts right.
_OPEN_MISSES = 256
_THREADS = 256

if TYPE_CHECKING:
    _Proxy = wrapt.ObjectProxy[Any]
else:
    _Proxy = wrapt.ObjectProxy


def watch_cache(cache: C, name: str, registry: CollectorRegistry | None = None) -> C:
    """Count the lookups, evictions and expiries of `cache` as `perfmw_cache_*{cache=name}`.

    from cachetools import LRUCache, cached
    users = perfmw.watch_cache(LRUCache(maxsize=1000), name="users")

    @cached(users)
    def load_user(user_id): ...

    The proxy is a drop-in for the cache. Watching the same cache under the same name again
    returns the same proxy; a name used by another live cache of the registry is a ValueError.
    """
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(
            f"perfmw.watch_cache() name must match {_NAME.pattern} (it becomes the value of "
            f"the `cache` label), got {name!r}"
        )
    missing = [
        m for m in ("__getitem__", "__setitem__", "__contains__", "get") if not hasattr(cache, m)
    ]
    if missing:
        raise TypeError(
            f"perfmw.watch_cache() takes a cachetools cache or a dict-like cache; "
            f"{type(cache).__name__} has no {', '.join(missing)}"
        )
    caches = _caches_for(registry)
    if isinstance(cache, CacheProxy):
        if caches.lookup(name) is cache:
            return cast(C, cache)
        raise ValueError(
            f"perfmw.watch_cache(): this cache is already watched as "
            f"{cache._self_state.name!r}; pass the cache itself, watched once"
        )
    return cast(C, caches.watch(cache, name))


class _State:
    """The counters and bookkeeping of one watched cache (slotted: the hit path reads it)."""

    __slots__ = (
        "bounded",
        "cache",
        "capacity",
        "computes",
        "expected",
        "expired",
        "hits",
        "maxsize",
        "misses",
        "name",
        "pending",
        "reads",
        "reported_expired",
        "sized",
        "timer",
    )

    def __init__(self, cache: Any, name: str) -> None:
        self.cache = cache
        self.name = name
        self.hits = 0
        self.misses = 0
        self.capacity = 0  # entries pushed out for room
        self.expired = 0  # expiries seen by the proxy's own writes and removals
        self.reported_expired = 0
        # Per thread: the key (and request) of a `key in cache` whose read (`cache[key]`, get,
        # pop, setdefault) is still to come, and the keys that `cache[key]` missed and are
        # still to be stored (cachetools' `cached(lock=...)` stores them with setdefault).
        self.reads: dict[int, tuple[Any, Any]] = {}
        self.pending: dict[int, dict[Any, None]] = {}
        self.bounded = hasattr(cache, "maxsize")
        self.maxsize = getattr(cache, "maxsize", 0)
        # Entries of their own size (getsizeof): any write may need room.
        self.sized = getattr(cache, "getsizeof", Cache.getsizeof) is not Cache.getsizeof
        timed = isinstance(cache, (TTLCache, TLRUCache))
        # TTLCache's timer doubles as a context manager that freezes time for nested calls.
        self.timer: Any = cache.timer if timed else None
        # Entries the cache holds when nothing expired behind the proxy's back (len(), currsize
        # and others remove expired entries inside the cache): the difference is expiries.
        self.expected = Cache.__len__(cache) if timed else 0
        missing = getattr(type(cache), "__missing__", None)
        self.computes = missing is not None and missing is not Cache.__missing__

    # Lookups.

    def count(self, found: bool) -> None:
        record = _current.get()
        if found:
            self.hits += 1
            if record is not None and not record.closed:
                record.cache_hits += 1
        else:
            self.misses += 1
            if record is not None and not record.closed:
                record.cache_misses += 1

    def looked_up(self, key: Any, found: bool) -> None:
        """Count a lookup unless it reads what this thread's `key in cache` just counted."""
        try:
            if self.pending:
                self.close_miss(key)
            if not (self.reads and self.completes_read(key)):
                self.count(found)
        except Exception as exc:
            _internal_error(exc)

    def missed(self, key: Any) -> None:
        """`cache[key]` raised KeyError: a miss, whose store may follow (see setdefault)."""
        if self.pending:
            self.close_miss(key)
        if not (self.reads and self.completes_read(key)):
            self.count(False)
            self.open_miss(key)

    def completes_read(self, key: Any) -> bool:
        """Whether this lookup is the read of this thread's last `key in cache` (not counted).

        Only within the same request: a membership test that found nothing and was followed by
        a store is not completed by a later request's lookup of that key.
        """
        opened = self.reads.pop(get_ident(), None)
        if opened is None or opened[1] is not _current.get():
            return False
        return opened[0] is key or bool(opened[0] == key)

    def open_miss(self, key: Any) -> None:
        pending = self.pending
        ident = get_ident()
        keys = pending.get(ident)
        if keys is None:
            if len(pending) >= _THREADS:
                pending.clear()
            keys = pending[ident] = {}
        keys[key] = None
        if len(keys) > _OPEN_MISSES:
            del keys[next(iter(keys))]

    def close_miss(self, key: Any) -> bool:
        """Forget a key this thread missed, now stored or looked up again; whether it was."""
        ident = get_ident()
        keys = self.pending.get(ident)
        if not keys or key not in keys:
            return False
        del keys[key]
        if not keys:
            self.pending.pop(ident, None)
        return True

    def compute(self, key: Any) -> Any:
        """`cache[key]` on a cache whose __missing__ computes the value instead of raising."""
        cache = self.cache
        found = key in cache
        try:
            value = cache[key] if found else self.write(key, cache.__getitem__, key)
        except KeyError:
            with _GUARD:
                self.missed(key)
            raise
        self.looked_up(key, found)
        return value

    def setdefault(self, key: Any, default: Any) -> Any:
        cache = self.cache
        found = key in cache
        if found:
            value = cache.setdefault(key, default)
        else:
            value = self.write(key, cache.setdefault, key, default)
        with _GUARD:
            completed = bool(self.reads) and self.completes_read(key)
            if self.pending and self.close_miss(key):
                completed = True  # the store of a miss already counted (cached(lock=...))
            if not completed:
                self.count(found)
        return value

    # Writes and removals: what left the cache, and why.

    def write(self, key: Any, op: Callable[..., Any], *args: Any) -> Any:
        """Run `op` (a store of `key`), counting the entries it evicted."""
        timer = self.timer
        if timer is not None:
            with timer as now:
                return self._timed_write(now, key, op, args)
        if not self.bounded:
            return op(*args)
        cache = self.cache
        before, new = -1, False
        with _GUARD:
            before, new = len(cache), key not in cache
        try:
            return op(*args)
        finally:
            with _GUARD:
                if before >= 0:
                    stored = key in cache
                    evicted = before + (new and stored) - len(cache)
                    if evicted > 0:
                        self.capacity += evicted

    def _timed_write(
        self, now: float, key: Any, op: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        # Time is frozen at `now`. A write that cannot need room only removes expired entries
        # (the cache expires before it stores). One that may need room gets them expired
        # first, as the cache itself would do at the same time, so what else leaves was pushed
        # out for room.
        cache = self.cache
        before, new, room = -1, False, False
        with _GUARD:
            self._catch_up()
            new = key not in cache
            room = self.sized or (new and _raw_currsize(cache) >= self.maxsize)
            if room:
                self.expired += len(cache.expire(now))
            before = Cache.__len__(cache)
        try:
            return op(*args)
        finally:
            with _GUARD:
                if before >= 0:
                    stored = key in cache
                    after = Cache.__len__(cache)
                    removed = before + (new and stored) - after
                    if not new and not stored:
                        # TLRUCache drops an entry updated with an already expired value.
                        removed -= 1
                        self.expired += 1
                    if removed > 0:
                        if room:
                            self.capacity += removed
                        else:
                            self.expired += removed
                    self.expected = after

    def remove(self, op: Callable[..., Any], *args: Any, expire_first: bool = False) -> Any:
        """Run `op`, an explicit removal by the application: not an eviction."""
        timer = self.timer
        if timer is None:
            return op(*args)
        cache = self.cache
        with timer as now:
            before = -1
            with _GUARD:
                self._catch_up()
                if expire_first:  # popitem: the cache expires first itself, at the same time
                    self.expired += len(cache.expire(now))
                before = Cache.__len__(cache)
            try:
                return op(*args)
            except KeyError:
                with _GUARD:
                    # `del cache[key]` of an expired entry: the cache removes it, then raises.
                    gone = before - Cache.__len__(cache)
                    if before >= 0 and gone > 0:
                        self.expired += gone
                raise
            finally:
                with _GUARD:
                    self.expected = Cache.__len__(cache)

    def _catch_up(self) -> None:
        """Count what expired inside the cache since the proxy last saw it (len(), currsize...)."""
        hidden = self.expected - Cache.__len__(self.cache)
        if hidden > 0:
            self.expired += hidden

    # Scrape time (another thread: read only, never mutate the cache).

    def expired_total(self) -> int:
        total = self.expired
        if self.timer is not None:
            total += max(0, self.expected - Cache.__len__(self.cache))
        # Counters never go down, even when a read races a write that moves the parts.
        if total > self.reported_expired:
            self.reported_expired = total
        return self.reported_expired


class CacheProxy(_Proxy):
    """The proxy `watch_cache` returns: the cache's own behaviour, counted."""

    __slots__ = ("_self_state",)

    def __init__(self, cache: Any, state: _State) -> None:
        super().__init__(cache)
        self._self_state = state

    # Lookups: one count per logical lookup (docs/caches.md); `cache[key]`, `key in cache` and
    # `get` are each cache's own (_proxy_class).

    def pop(self, key: Any, *default: Any) -> Any:
        state = _state(self)
        cache = state.cache
        value = state.remove(cache.pop, key, _MISSING)
        state.looked_up(key, value is not _MISSING)
        if value is _MISSING:
            if default:
                return default[0]
            raise KeyError(key)
        return value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        state = _state(self)
        timer = state.timer
        if timer is None:
            return state.setdefault(key, default)
        with timer:  # the presence test and the store see the same time
            return state.setdefault(key, default)

    # Writes and removals: evictions counted, never lookups.

    def __setitem__(self, key: Any, value: Any) -> None:
        state = _state(self)
        if state.pending:
            with _GUARD:
                state.close_miss(key)
        cache = state.cache
        if state.timer is None and not state.bounded:
            cache[key] = value
            return
        state.write(key, cache.__setitem__, key, value)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        # MutableMapping.update stores through the cache itself, unseen: store through self.
        if isinstance(other, Mapping):
            for key in other:
                self[key] = other[key]
        elif hasattr(other, "keys"):
            for key in other.keys():  # noqa: SIM118 (a mapping-like with keys() only)
                self[key] = other[key]
        else:
            for key, value in other:
                self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def __delitem__(self, key: Any) -> None:
        state = _state(self)
        state.remove(state.cache.__delitem__, key)

    def popitem(self) -> Any:
        state = _state(self)
        return state.remove(state.cache.popitem, expire_first=True)

    def clear(self) -> None:
        state = _state(self)
        state.remove(state.cache.clear)

    # A copy or an unpickled proxy is the plain cache: the counters belong to this process.

    def __copy__(self) -> Any:
        return copy.copy(self.__wrapped__)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.__wrapped__, memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)

    def __reduce__(self) -> Any:
        return self.__wrapped__.__reduce__()

    def __repr__(self) -> str:
        return f"watch_cache({self.__wrapped__!r}, name={_state(self).name!r})"


# The state's slot read directly, past wrapt's attribute lookup (~65 ns through wrapt).
_state: Callable[[CacheProxy], _State] = CacheProxy.__dict__["_self_state"].__get__


def _proxy_class(state: _State) -> type[CacheProxy]:
    """A CacheProxy subclass whose `cache[key]`, `key in cache` and `get` close over one cache's
    state.

    These are the hit path: closures read no attribute of the proxy, which saves a good
    part of the proxy's cost, so each watched cache gets its own class (as wrapt's
    AutoObjectProxy does). perfmw's own errors are handled with try/except and the guard's
    reporter, without the guard's context manager (~100 ns a use).
    """
    cache = state.cache
    reads = state.reads
    pending = state.pending

    def __getitem__(self: CacheProxy, key: Any) -> Any:
        try:
            value = cache[key]
        except KeyError:
            try:
                state.missed(key)
            except Exception as exc:
                _internal_error(exc)
            raise
        try:
            if pending:
                state.close_miss(key)
            record = _current.get()
            if reads:
                # The read of this thread's `key in cache`, in the same request: counted there.
                opened = reads.pop(get_ident(), None)
                if opened is not None and opened[1] is record:
                    opened_key = opened[0]
                    if opened_key is key or opened_key == key:
                        return value
            state.hits += 1
            if record is not None and not record.closed:
                record.cache_hits += 1
        except Exception as exc:
            _internal_error(exc)
        return value

    def compute(self: CacheProxy, key: Any) -> Any:
        return state.compute(key)

    def __contains__(self: CacheProxy, key: Any) -> bool:
        found = key in cache
        try:
            if pending:
                state.close_miss(key)
            record = _current.get()
            reads[get_ident()] = (key, record)
            if record is not None and record.closed:
                record = None
            if found:
                state.hits += 1
                if record is not None:
                    record.cache_hits += 1
            else:
                state.misses += 1
                if record is not None:
                    record.cache_misses += 1
                if len(reads) > _THREADS:  # threads long gone: off the hit path
                    reads.clear()
        except Exception as exc:
            _internal_error(exc)
        return found

    def get(self: CacheProxy, key: Any, default: Any = None) -> Any:
        value = cache.get(key, _MISSING)
        state.looked_up(key, value is not _MISSING)
        return default if value is _MISSING else value

    namespace = {
        "__slots__": (),
        "__getitem__": compute if state.computes else __getitem__,
        "__contains__": __contains__,
        "get": get,
    }
    return type(CacheProxy.__name__, (CacheProxy,), namespace)


def _internal_error(exc: Exception) -> None:
    with contextlib.suppress(Exception):  # the reporter itself must never raise
        report_internal_error("cache", exc)


class _Caches:
    """The caches watched in one registry, and the scrape-time source of their metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, weakref.ref[CacheProxy]] = {}

    def lookup(self, name: str) -> CacheProxy | None:
        ref = self._by_name.get(name)
        return None if ref is None else ref()

    def watch(self, cache: Any, name: str) -> CacheProxy:
        with self._lock:
            existing = self.lookup(name)
            if existing is not None:
                if existing.__wrapped__ is cache:
                    return existing
                raise ValueError(
                    f"perfmw.watch_cache(): the name {name!r} is already used by another live "
                    "cache in this registry; give each cache its own name"
                )
            state = _State(cache, name)
            proxy = _proxy_class(state)(cache, state)
            # A weak reference: a cache that was garbage-collected frees its name and series.
            self._by_name[name] = weakref.ref(proxy)
            return proxy

    def _live(self) -> list[CacheProxy]:
        with self._lock:
            live: list[CacheProxy] = []
            for name, ref in list(self._by_name.items()):
                proxy = ref()
                if proxy is None:
                    del self._by_name[name]
                else:
                    live.append(proxy)
        live.sort(key=lambda proxy: proxy._self_state.name)
        return live

    def __call__(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "perfmw_cache_requests",
            "Cache lookups, each logical lookup counted once, by result.",
            labels=("cache", "result"),
        )
        evictions = CounterMetricFamily(
            "perfmw_cache_evictions",
            "Entries the cache removed: pushed out for room (capacity) or expired.",
            labels=("cache", "reason"),
        )
        size = GaugeMetricFamily(
            "perfmw_cache_size", "Current size of the cache (its currsize).", labels=("cache",)
        )
        max_size = GaugeMetricFamily(
            "perfmw_cache_max_size", "Maximum size of the cache (its maxsize).", labels=("cache",)
        )
        for proxy in self._live():
            state: _State = proxy._self_state
            cache = proxy.__wrapped__
            name = state.name
            with _GUARD:
                requests.add_metric([name, "hit"], state.hits)
                requests.add_metric([name, "miss"], state.misses)
                evictions.add_metric([name, "capacity"], state.capacity)
                evictions.add_metric([name, "expired"], state.expired_total())
                size.add_metric([name], _size(cache))
                maxsize = getattr(cache, "maxsize", None)
                if isinstance(maxsize, (int, float)):
                    max_size.add_metric([name], maxsize)
        yield requests
        yield evictions
        yield size
        yield max_size


def _size(cache: Any) -> float:
    """The cache's currsize, read without side effects (the timed caches' currsize expires)."""
    if isinstance(cache, Cache):
        return _raw_currsize(cache)
    currsize = getattr(cache, "currsize", None)
    if isinstance(currsize, (int, float)):
        return currsize
    return len(cache)


def _raw_currsize(cache: Cache[Any, Any]) -> float:
    """Cache.currsize without the timed caches' expiry: no side effect."""
    return cast(float, Cache.currsize.fget(cache))  # type: ignore[attr-defined]


_tables: weakref.WeakKeyDictionary[CollectorRegistry, _Caches] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _caches_for(registry: CollectorRegistry | None) -> _Caches:
    registry = REGISTRY if registry is None else registry
    with _tables_lock:
        caches = _tables.get(registry)
        if caches is None:
            caches = _tables[registry] = _Caches()
            sink_for(registry).add_source(caches)
        return caches
