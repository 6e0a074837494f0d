"""watch_cache: every lookup idiom on every cachetools cache class, with exact counts as scraped."""

from __future__ import annotations

import asyncio
import collections
import copy
import gc
import pickle
import random
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import cachetools
import httpx
import pytest
from cachetools import (
    Cache,
    LRUCache,
    RRCache,
    TLRUCache,
    TTLCache,
    cached,
    cachedmethod,
)
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import perfmw
from perfmw import _guard
from perfmw.record import _current
from support import sample, samples, serve

KINDS = ("Cache", "LRUCache", "LFUCache", "FIFOCache", "RRCache", "TTLCache", "TLRUCache")
TIMED = ("TTLCache", "TLRUCache")
TTL = 10.0


class Clock:
    """A fake timer for TTLCache/TLRUCache: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ten_seconds(_key: Any, _value: Any, now: float) -> float:
    return now + TTL


def first(keys: list[Any]) -> Any:
    return keys[0]


def value_seconds(_key: Any, value: float, now: float) -> float:
    return now + value


def new_cache(kind: str, maxsize: int, clock: Clock) -> Cache:
    if kind == "TTLCache":
        return TTLCache(maxsize, ttl=TTL, timer=clock)
    if kind == "TLRUCache":
        return TLRUCache(maxsize, ttu=ten_seconds, timer=clock)
    if kind == "RRCache":
        return RRCache(maxsize, choice=first)  # deterministic: evicts the oldest key
    cls: type[Cache] = getattr(cachetools, kind)
    return cls(maxsize)


@dataclass(frozen=True)
class Counts:
    hits: float | None
    misses: float | None
    capacity: float | None = 0
    expired: float | None = 0
    size: float | None = None
    max_size: float | None = None


def counts(registry: CollectorRegistry, name: str, text: str | None = None) -> Counts:
    """The cache's series, as a scrape of the registry shows them."""
    text = generate_latest(registry).decode() if text is None else text
    return Counts(
        hits=sample(text, "perfmw_cache_requests_total", cache=name, result="hit"),
        misses=sample(text, "perfmw_cache_requests_total", cache=name, result="miss"),
        capacity=sample(text, "perfmw_cache_evictions_total", cache=name, reason="capacity"),
        expired=sample(text, "perfmw_cache_evictions_total", cache=name, reason="expired"),
        size=sample(text, "perfmw_cache_size", cache=name),
        max_size=sample(text, "perfmw_cache_max_size", cache=name),
    )


@dataclass
class Subject:
    """One cache class under test, watched in a fresh registry, with a fake clock."""

    kind: str
    registry: CollectorRegistry
    clock: Clock

    def watch(self, maxsize: int = 10, name: str = "subject") -> Any:
        return perfmw.watch_cache(new_cache(self.kind, maxsize, self.clock), name, self.registry)

    def counts(self, name: str = "subject") -> Counts:
        return counts(self.registry, name)

    @property
    def timed(self) -> bool:
        return self.kind in TIMED


@pytest.fixture(params=KINDS)
def subject(request: pytest.FixtureRequest, registry: CollectorRegistry) -> Subject:
    return Subject(request.param, registry, Clock())


@pytest.fixture(params=TIMED)
def timed(request: pytest.FixtureRequest, registry: CollectorRegistry) -> Subject:
    return Subject(request.param, registry, Clock())


# Lookup idioms, on every cache class.


def test_getitem_hit_and_keyerror_miss(subject: Subject) -> None:
    cache = subject.watch()
    cache["a"] = 1
    assert cache["a"] == 1
    assert cache["a"] == 1
    with pytest.raises(KeyError):
        cache["b"]
    assert subject.counts() == Counts(hits=2, misses=1, size=1, max_size=10)


def test_in_followed_by_read_is_one_lookup(subject: Subject) -> None:
    cache = subject.watch()
    cache["a"] = 1
    for _ in range(3):
        assert "a" in cache
        assert cache["a"] == 1  # completes the `in`: not counted again
    if "b" not in cache:  # miss
        cache["b"] = 2
    assert cache["b"] == 2  # the read after the store completes the same lookup
    assert "a" in cache and cache.get("a") == 1  # one hit
    assert "a" in cache and cache.pop("a") == 1  # one hit
    assert "c" not in cache  # a membership test alone is a lookup...
    assert "c" not in cache  # ...and so is the next one
    assert subject.counts() == Counts(hits=5, misses=3, size=1, max_size=10)


def test_get(subject: Subject) -> None:
    cache = subject.watch()
    cache["a"] = 1
    assert cache.get("a") == 1
    assert cache.get("b") is None
    assert cache.get("b", 5) == 5
    assert subject.counts() == Counts(hits=1, misses=2, size=1, max_size=10)


def test_setdefault(subject: Subject) -> None:
    cache = subject.watch()
    assert cache.setdefault("a", 1) == 1  # miss, stored
    assert cache.setdefault("a", 2) == 1  # hit
    assert cache["a"] == 1  # hit
    assert subject.counts() == Counts(hits=2, misses=1, size=1, max_size=10)


def test_pop_is_a_lookup_del_and_clear_are_not(subject: Subject) -> None:
    cache = subject.watch()
    cache.update({"a": 1, "b": 2, "c": 3})
    assert cache.pop("a") == 1  # hit
    assert cache.pop("a", None) is None  # miss
    with pytest.raises(KeyError):
        cache.pop("a")  # miss
    del cache["b"]
    with pytest.raises(KeyError):
        del cache["b"]
    cache.clear()
    # Removals by the application are not evictions: only the size shows them.
    assert subject.counts() == Counts(hits=1, misses=2, size=0, max_size=10)


@pytest.mark.parametrize("variant", ["plain", "lock", "rlock", "condition", "info", "lock+info"])
def test_cached_function(subject: Subject, variant: str) -> None:
    cache = subject.watch(maxsize=2)
    options: dict[str, Any] = {"info": "info" in variant}
    if "lock" in variant:
        options["lock"] = threading.RLock() if variant == "rlock" else threading.Lock()
    if variant == "condition":
        options["condition"] = threading.Condition()
    calls: list[int] = []

    @cached(cache, **options)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    for n in (1, 2, 1, 1, 3, 2, 3):
        assert square(n) == n * n
    # 1 2 miss, 1 1 hit, 3 miss (evicts one), then 2 and 3 depend on the eviction policy:
    # cachetools' own info=True count is the reference for every class.
    misses = len(calls)
    assert subject.counts() == Counts(
        hits=7 - misses, misses=misses, capacity=misses - 2, size=2, max_size=2
    )
    if options["info"]:
        info = square.cache_info()  # type: ignore[attr-defined]
        assert (info.hits, info.misses, info.maxsize, info.currsize) == (7 - misses, misses, 2, 2)


def test_cached_recursive_with_rlock_counts_like_cachetools(subject: Subject) -> None:
    cache = subject.watch(maxsize=100)

    @cached(cache, lock=threading.RLock(), info=True)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert fib(30) == 832040
    info = fib.cache_info()  # type: ignore[attr-defined]
    assert (info.hits, info.misses) == (28, 31)
    assert subject.counts() == Counts(hits=28, misses=31, size=31, max_size=100)


@pytest.mark.parametrize("locked", [False, True])
def test_cachedmethod(subject: Subject, locked: bool) -> None:
    cache = subject.watch()

    class Directory:
        def __init__(self) -> None:
            self.cache = cache
            self.lock = threading.Lock()
            self.loads = 0

        if locked:

            @cachedmethod(lambda self: self.cache, lock=lambda self: self.lock)
            def lookup(self, name: str) -> str:
                self.loads += 1
                return name.upper()
        else:

            @cachedmethod(lambda self: self.cache)
            def lookup(self, name: str) -> str:
                self.loads += 1
                return name.upper()

    directory = Directory()
    for name in ("ada", "bob", "ada", "ada", "bob"):
        assert directory.lookup(name) == name.upper()
    assert directory.loads == 2
    assert subject.counts() == Counts(hits=3, misses=2, size=2, max_size=10)


# Async functions whose result is cached.


def test_cached_coroutine_function_counts_like_the_bare_cache(subject: Subject) -> None:
    # cachetools 8 has no coroutine support: `cached` on an `async def` stores the coroutine
    # object, and awaiting it a second time fails. The proxy changes nothing of that; it
    # counts the lookups cachetools makes (docs/caches.md shows the idioms that work).
    cache = subject.watch()

    @cached(cache)
    async def fetch(n: int) -> int:
        return n * 10

    class Service:
        def __init__(self) -> None:
            self.cache = cache

        @cachedmethod(lambda self: self.cache)
        async def fetch(self, n: int) -> int:
            return n * 100

    async def main() -> None:
        assert await fetch(1) == 10
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            await fetch(1)
        service = Service()
        assert await service.fetch(2) == 200
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            await service.fetch(2)

    asyncio.run(main())
    assert subject.counts() == Counts(hits=2, misses=2, size=2, max_size=10)


def test_async_result_cached_with_explicit_lookups(subject: Subject) -> None:
    cache = subject.watch()
    loads: list[int] = []

    async def fetch(n: int) -> int:
        await asyncio.sleep(0)
        loads.append(n)
        return n * 10

    async def by_keyerror(n: int) -> int:
        try:
            return int(cache[n])
        except KeyError:
            pass
        cache[n] = value = await fetch(n)
        return value

    async def by_membership(n: int) -> int:
        if n in cache:
            return int(cache[n])
        cache[n] = value = await fetch(n)
        return value

    async def main() -> None:
        for n in (1, 2, 1, 1):
            assert await by_keyerror(n) == n * 10
        for n in (3, 1, 3):
            assert await by_membership(n) == n * 10
        # Concurrent tasks on one loop: each lookup still counts once.
        results = await asyncio.gather(*(by_membership(n) for n in (4, 4, 1, 2)))
        assert results == [40, 40, 10, 20]

    asyncio.run(main())
    # keyerror: 1 2 miss, 1 1 hit; membership: 3 miss, 1 3 hit; gather: 4 4 miss, 1 2 hit
    assert loads == [1, 2, 3, 4, 4]
    assert subject.counts() == Counts(hits=6, misses=5, size=4, max_size=10)


def test_async_result_cached_as_a_task_with_cached(subject: Subject) -> None:
    # The way to cache an async result with cachetools 8's own decorators: cache the task.
    cache = subject.watch()
    loads: list[int] = []

    async def fetch(n: int) -> int:
        loads.append(n)
        return n * 10

    @cached(cache)
    def fetch_once(n: int) -> asyncio.Future[int]:
        return asyncio.ensure_future(fetch(n))

    class Service:
        def __init__(self) -> None:
            self.cache = cache

        @cachedmethod(lambda self: self.cache)
        def fetch_once(self, n: int) -> asyncio.Future[int]:
            return asyncio.ensure_future(fetch(n))

    async def main() -> None:
        for n in (1, 1, 2, 1):
            assert await fetch_once(n) == n * 10
        service = Service()
        for n in (5, 5):
            assert await service.fetch_once(n) == 50

    asyncio.run(main())
    assert loads == [1, 2, 5]
    assert subject.counts() == Counts(hits=3, misses=3, size=3, max_size=10)


# Evictions: capacity and expiry, told apart.


def test_capacity_evictions(subject: Subject) -> None:
    cache = subject.watch(maxsize=2)
    for n in range(5):
        cache[n] = n
    cache[4] = 44  # replacing an entry evicts nothing
    assert subject.counts() == Counts(hits=0, misses=0, capacity=3, size=2, max_size=2)
    cache.update({10: 1, 11: 2})
    cache.update([(12, 3)], thirteen=4)
    assert cache.setdefault(14, 5) == 5
    assert subject.counts() == Counts(hits=0, misses=1, capacity=8, size=2, max_size=2)
    assert cache.popitem() is not None  # an explicit removal, not an eviction
    assert subject.counts() == Counts(hits=0, misses=1, capacity=8, size=1, max_size=2)


def test_capacity_evictions_with_getsizeof(registry: CollectorRegistry) -> None:
    cache = perfmw.watch_cache(LRUCache(maxsize=10, getsizeof=len), "sized", registry)
    cache["a"] = "xxxx"
    cache["b"] = "yyyy"
    cache["c"] = "zzzz"  # 12 > 10: "a" goes
    assert counts(registry, "sized") == Counts(hits=0, misses=0, capacity=1, size=8, max_size=10)
    cache["b"] = "yyyyyyyy"  # grows to 8: "c" goes
    assert counts(registry, "sized") == Counts(hits=0, misses=0, capacity=2, size=8, max_size=10)


def test_lookup_of_expired_entry_is_a_miss(timed: Subject) -> None:
    cache = timed.watch()
    cache["a"] = 1
    timed.clock.now = TTL  # expired: a lookup is a miss, the entry is not removed yet
    with pytest.raises(KeyError):
        cache["a"]
    assert cache.get("a") is None
    assert "a" not in cache
    assert cache.pop("a", None) is None  # the read of the `in` above: not counted again
    assert timed.counts() == Counts(hits=0, misses=3, size=1, max_size=10)
    assert cache.setdefault("a", 2) == 2  # miss; the store removes the expired entry first
    assert timed.counts() == Counts(hits=0, misses=4, expired=1, size=1, max_size=10)
    assert cache["a"] == 2
    assert timed.counts() == Counts(hits=1, misses=4, expired=1, size=1, max_size=10)


def test_cached_function_reloads_an_expired_value(timed: Subject) -> None:
    cache = timed.watch()
    loads: list[int] = []

    @cached(cache, lock=threading.Lock())
    def square(n: int) -> int:
        loads.append(n)
        return n * n

    assert [square(2), square(2), square(3)] == [4, 4, 9]
    timed.clock.now = TTL + 1
    assert [square(2), square(2)] == [4, 4]  # a miss (expired), stored anew, then a hit
    assert loads == [2, 3, 2]
    # The store of the reloaded value removed both expired entries first.
    assert timed.counts() == Counts(hits=2, misses=3, expired=2, size=1, max_size=10)


def test_expiries_counted_whoever_removes_them(timed: Subject) -> None:
    cache = timed.watch()
    cache["a"] = 1
    cache["b"] = 2
    timed.clock.now = 5
    cache["c"] = 3  # expires at 15
    timed.clock.now = 12
    # Scraping never touches the cache: the expired entries still count in its size.
    assert timed.counts() == Counts(hits=0, misses=0, expired=0, size=3, max_size=10)
    assert len(cache) == 1  # the cache removes "a" and "b" itself
    assert timed.counts() == Counts(hits=0, misses=0, expired=2, size=1, max_size=10)
    timed.clock.now = 20
    assert cache.expire() == [("c", 3)]
    assert timed.counts() == Counts(hits=0, misses=0, expired=3, size=0, max_size=10)
    cache["d"] = 4
    timed.clock.now = 40
    assert cache.currsize == 0  # currsize expires too
    cache["e"] = 5
    timed.clock.now = 60
    assert not cache  # and so does bool()
    assert timed.counts() == Counts(hits=0, misses=0, expired=5, size=0, max_size=10)


def test_capacity_and_expiry_told_apart(timed: Subject) -> None:
    cache = timed.watch(maxsize=2)
    cache["a"] = 1
    cache["b"] = 2
    timed.clock.now = 5
    cache["c"] = 3  # full: "a" pushed out for room
    assert timed.counts() == Counts(hits=0, misses=0, capacity=1, size=2, max_size=2)
    timed.clock.now = 11  # "b" expired at 10, "c" lives until 15
    cache["d"] = 4  # "b" removed as expired: room without a capacity eviction
    assert timed.counts() == Counts(hits=0, misses=0, capacity=1, expired=1, size=2, max_size=2)
    timed.clock.now = 12
    cache["e"] = 5  # "c" pushed out for room
    assert timed.counts() == Counts(hits=0, misses=0, capacity=2, expired=1, size=2, max_size=2)
    timed.clock.now = 30
    with pytest.raises(KeyError):
        cache.popitem()  # both expired: removed as such, and nothing is left to pop
    assert timed.counts() == Counts(hits=0, misses=0, capacity=2, expired=3, size=0, max_size=2)


def test_tlru_update_with_an_expired_value_is_an_expiry(registry: CollectorRegistry) -> None:
    clock = Clock()
    cache = perfmw.watch_cache(TLRUCache(5, ttu=value_seconds, timer=clock), "tlru", registry)
    cache["a"] = 5.0
    cache["a"] = 0.0  # expires at once: TLRUCache drops the entry
    assert "a" not in cache
    assert counts(registry, "tlru") == Counts(hits=0, misses=1, expired=1, size=0, max_size=5)


def test_del_of_an_expired_entry(timed: Subject) -> None:
    bare = new_cache(timed.kind, 10, timed.clock)
    cache = timed.watch()
    bare["a"] = cache["a"] = 1
    timed.clock.now = TTL
    for mapping in (bare, cache):
        with pytest.raises(KeyError):
            del mapping["a"]
        assert len(mapping) == 0
    assert timed.counts() == Counts(hits=0, misses=0, expired=1, size=0, max_size=10)


# Threads.


@pytest.mark.parametrize("kind", KINDS)
def test_eight_threads_hammering_one_cached_function(
    registry: CollectorRegistry, kind: str
) -> None:
    cache = perfmw.watch_cache(new_cache(kind, 16, Clock()), "hammered", registry)
    loads = collections.Counter[int]()
    loads_lock = threading.Lock()

    @cached(cache, lock=threading.Lock())
    def square(n: int) -> int:
        with loads_lock:
            loads[n] += 1
        return n * n

    calls_per_thread = 2000
    in_threads(lambda rng: square(rng.randrange(40)), calls_per_thread)
    found = counts(registry, "hammered")
    assert found.hits is not None and found.misses is not None
    assert found.hits + found.misses == 8 * calls_per_thread
    assert found.misses == sum(loads.values())
    # Every miss stores its value unless another thread stored it meanwhile; all but 16 of the
    # stored values were pushed out for room.
    assert found.capacity is not None
    assert 0 < found.capacity <= found.misses - 16
    assert found.size == 16


@pytest.mark.parametrize("idiom", ["cached", "membership"])
def test_eight_threads_on_a_dict_without_lock(registry: CollectorRegistry, idiom: str) -> None:
    cache: dict[int, int] = perfmw.watch_cache({}, "shared", registry)
    loads = collections.Counter[int]()
    loads_lock = threading.Lock()

    def compute(n: int) -> int:
        with loads_lock:
            loads[n] += 1
        return n * n

    cached_square = cached(cache)(compute)

    def by_membership(n: int) -> int:
        if n in cache:
            return cache[n]
        cache[n] = value = compute(n)
        return value

    square = cached_square if idiom == "cached" else by_membership
    in_threads(lambda rng: square(rng.randrange(200)), 2000)
    found = counts(registry, "shared")
    assert found.hits is not None and found.misses is not None
    assert found.hits + found.misses == 8 * 2000
    assert found.misses == sum(loads.values())
    assert found.size == len(cache) == 200
    assert found.max_size is None  # a dict has no maxsize


def in_threads(
    call: Callable[[random.Random], Any], calls_per_thread: int, threads: int = 8
) -> None:
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            barrier.wait(timeout=10)
            for _ in range(calls_per_thread):
                call(rng)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in workers)
    assert not errors, errors


# A drop-in.


def test_behaves_like_the_bare_cache(subject: Subject) -> None:
    """A random walk of operations gives the same results on the proxy and on a twin cache."""
    bare = new_cache(subject.kind, 5, subject.clock)
    cache = subject.watch(maxsize=5)
    rng = random.Random(7)

    def outcome(mapping: Any, op: str, key: int) -> Any:
        try:
            if op == "get":
                return mapping.get(key, "default")
            if op == "getitem":
                return mapping[key]
            if op == "in":
                return key in mapping
            if op == "set":
                mapping[key] = key * 2
                return None
            if op == "del":
                del mapping[key]
                return None
            if op == "pop":
                return mapping.pop(key, "default")
            if op == "setdefault":
                return mapping.setdefault(key, key * 3)
            if op == "popitem":
                return mapping.popitem()
            if op == "len":
                return len(mapping)
            if op == "iter":
                return list(mapping)
            if op == "items":
                return list(mapping.items())
            if op == "expire":
                return [list(pair) for pair in mapping.expire()] if subject.timed else None
        except KeyError as exc:
            return ("KeyError", exc.args)
        raise AssertionError(op)

    ops = ("get", "getitem", "in", "set", "set", "del", "pop", "setdefault", "popitem", "len")
    ops += ("iter", "items", "expire")
    for _ in range(2000):
        op, key = rng.choice(ops), rng.randrange(8)
        assert outcome(cache, op, key) == outcome(bare, op, key), (op, key)
        if rng.random() < 0.05:
            subject.clock.now += rng.choice((1, 4, 11))
    assert list(cache.items()) == list(bare.items())
    assert cache.currsize == bare.currsize


def test_drop_in_attributes_copy_and_pickle(subject: Subject) -> None:
    cache = subject.watch(maxsize=3)
    cls = type(new_cache(subject.kind, 1, subject.clock))
    assert isinstance(cache, cls)
    assert isinstance(cache, Cache)
    assert isinstance(cache, MutableMapping)
    for n in range(4):
        cache[n] = str(n)
    assert len(cache) == 3
    assert sorted(cache) == sorted(dict(cache.items()))
    assert (cache.maxsize, cache.currsize) == (3, 3)
    if subject.timed:
        assert cache.timer() == 0.0
        assert cache.expire() == []
    if subject.kind == "TTLCache":
        assert cache.ttl == TTL
    assert repr(cache).startswith(f"watch_cache({cls.__name__}(")
    # Copies and unpickled caches are plain caches: the counters stay with the proxy.
    for twin in (copy.copy(cache), copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert type(twin) is cls
        assert dict(twin.items()) == dict(cache.items())
        twin[99] = "x"
        assert 99 not in cache
    cache.clear()
    assert len(cache) == 0
    assert subject.counts() == Counts(hits=0, misses=3, capacity=1, size=0, max_size=3)


def test_plain_dict_and_computing_caches(registry: CollectorRegistry) -> None:
    plain = perfmw.watch_cache({"a": 1}, "plain", registry)
    assert isinstance(plain, dict)
    assert plain["a"] == 1
    assert plain.get("b") is None
    assert counts(registry, "plain") == Counts(hits=1, misses=1, size=1, max_size=None)

    # A cache whose __missing__ computes the value: a computed value is a miss.
    class Squares(LRUCache):  # type: ignore[type-arg]
        def __missing__(self, key: int) -> int:
            self[key] = value = key * key
            return value

    squares = perfmw.watch_cache(Squares(maxsize=2), "squares", registry)
    assert [squares[n] for n in (2, 2, 3, 4, 2)] == [4, 4, 9, 16, 4]
    assert counts(registry, "squares") == Counts(hits=1, misses=4, capacity=2, size=2, max_size=2)
    defaults = perfmw.watch_cache(collections.defaultdict(list), "defaults", registry)
    defaults["x"].append(1)
    defaults["x"].append(2)
    assert counts(registry, "defaults") == Counts(hits=1, misses=1, size=1, max_size=None)


# Names.


@pytest.mark.parametrize("name", ["", "1st", "a b", "servers{}", "x" * 65, "ümlaut", None, 7])
def test_invalid_names(registry: CollectorRegistry, name: Any) -> None:
    with pytest.raises(ValueError, match="name must match"):
        perfmw.watch_cache(LRUCache(3), name, registry)


def test_not_a_cache(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match="has no"):
        perfmw.watch_cache([1, 2], "listy", registry)


def test_names_are_unique_per_registry_among_live_caches(registry: CollectorRegistry) -> None:
    first = LRUCache(3)
    watched = perfmw.watch_cache(first, "users", registry)
    assert perfmw.watch_cache(first, "users", registry) is watched
    assert perfmw.watch_cache(watched, "users", registry) is watched
    with pytest.raises(ValueError, match="already used by another live cache"):
        perfmw.watch_cache(LRUCache(3), "users", registry)
    with pytest.raises(ValueError, match="already watched as 'users'"):
        perfmw.watch_cache(watched, "people", registry)
    other = CollectorRegistry()
    assert perfmw.watch_cache(LRUCache(3), "users", other) is not watched  # another registry

    watched["a"] = 1
    assert watched["a"] == 1
    assert counts(registry, "users").hits == 1
    del watched
    gc.collect()
    # The collected cache freed its name, and its series are gone.
    assert counts(registry, "users").hits is None
    again = perfmw.watch_cache(LRUCache(3), "users", registry)
    assert counts(registry, "users") == Counts(hits=0, misses=0, size=0, max_size=3)
    assert again is not None


def test_series_of_each_cache(registry: CollectorRegistry) -> None:
    a = perfmw.watch_cache(LRUCache(3), "alpha", registry)
    b = perfmw.watch_cache(TTLCache(4, ttl=1), "beta.v2", registry)
    a["k"] = b["k"] = 1
    text = generate_latest(registry).decode()
    names = {
        (name, dict(labels).get("cache"))
        for (name, labels) in samples(text)
        if name.startswith("perfmw_cache_")
    }
    assert names == {
        (metric, cache)
        for cache in ("alpha", "beta.v2")
        for metric in (
            "perfmw_cache_requests_total",
            "perfmw_cache_evictions_total",
            "perfmw_cache_size",
            "perfmw_cache_max_size",
        )
    }


# Per request, through a real server.


def test_per_request_counts_and_server_timing(registry: CollectorRegistry) -> None:
    cache = perfmw.watch_cache(TTLCache(maxsize=10, ttl=60), "profiles", registry)
    cache.update({"ada": 1, "bob": 2})
    seen: list[tuple[int, int]] = []

    async def profiles(request: Request) -> JSONResponse:
        found = [cache.get("ada"), cache["bob"]]
        if "ada" in cache:
            found.append(cache["ada"])
        if "eve" not in cache:
            found.append(None)
        record = perfmw.current_request()
        assert record is not None
        seen.append((record.cache_hits, record.cache_misses))
        return JSONResponse(found)

    app = Starlette(routes=[Route("/profiles", profiles)])
    perfmw.instrument(app, settings=perfmw.Settings(server_timing=True), registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        response = client.get("/profiles")
        assert response.json() == [1, 2, 1, None]
        timing = response.headers["server-timing"]
        assert 'cache;desc="3 hit 1 miss"' in [part.strip() for part in timing.split(",")]
        response = client.get("/profiles")
        metrics = client.get("/metrics").text
    assert seen == [(3, 1), (3, 1)]
    assert counts(registry, "profiles", metrics) == Counts(hits=6, misses=2, size=2, max_size=10)


def test_a_membership_test_pairs_with_a_read_of_its_own_request_only(
    registry: CollectorRegistry,
) -> None:
    cache = perfmw.watch_cache(LRUCache(3), "paired", registry)
    with perfmw.track("first") as first:
        if "k" not in cache:  # a miss; no read follows in this request
            cache["k"] = 1
    with perfmw.track("second") as second:
        assert cache.pop("k") == 1  # another request's lookup: a hit of its own
    assert (first.cache_hits, first.cache_misses) == (0, 1)
    assert (second.cache_hits, second.cache_misses) == (1, 0)
    assert counts(registry, "paired") == Counts(hits=1, misses=1, size=0, max_size=3)


def test_counts_outside_a_request_go_to_no_record(registry: CollectorRegistry) -> None:
    cache = perfmw.watch_cache(LRUCache(3), "jobs", registry)
    cache["a"] = 1
    with perfmw.track("nightly") as record:
        assert cache["a"] == 1
        assert cache.get("b") is None
    assert (record.cache_hits, record.cache_misses) == (1, 1)
    assert cache["a"] == 1  # no record: the cache's counters only
    assert (record.cache_hits, record.cache_misses) == (1, 1)
    assert counts(registry, "jobs") == Counts(hits=2, misses=1, size=1, max_size=3)


@pytest.mark.faults
def test_a_failure_in_the_bookkeeping_never_reaches_the_application(
    registry: CollectorRegistry,
) -> None:
    class Broken:
        closed = False

        @property
        def cache_hits(self) -> int:
            return 0

        @cache_hits.setter
        def cache_hits(self, value: int) -> None:
            raise RuntimeError("broken record")

    cache = perfmw.watch_cache(LRUCache(3), "fragile", registry)
    cache["a"] = 1
    before = _guard.error_counts["cache"]
    token = _current.set(Broken())  # type: ignore[arg-type]
    try:
        assert cache["a"] == 1
        assert cache.get("a") == 1
        assert "a" in cache
    finally:
        _current.reset(token)
    assert _guard.error_counts["cache"] == before + 3
    text = generate_latest(registry).decode()
    assert sample(text, "perfmw_internal_errors_total", component="cache") == before + 3


# The example service.


def test_example_app_hit_rate_rises_and_invalidation_is_counted(
    registry: CollectorRegistry, mongo_uri: str
) -> None:
    from examples.fastapi_app.app import create_app

    app = create_app(mongo_uri, settings=perfmw.Settings(server_timing=True), registry=registry)

    def scrape(client: httpx.Client) -> Counts:
        return counts(registry, "servers", client.get("/metrics").text)

    def cache_timing(response: httpx.Response) -> str:
        assert response.status_code == 200
        parts = [part.strip() for part in response.headers["server-timing"].split(",")]
        return next(part for part in parts if part.startswith("cache;"))

    def exercise(client: httpx.Client) -> list[Counts]:
        seen = []
        for server_id in range(10):  # warm-up: every lookup misses and fills the cache
            response = client.get(f"/servers/{server_id}")
            assert cache_timing(response) == 'cache;desc="0 hit 1 miss"'
        seen.append(scrape(client))
        for _ in range(3):
            for server_id in range(10):
                response = client.get(f"/servers/{server_id}")
                assert cache_timing(response) == 'cache;desc="1 hit 0 miss"'
            seen.append(scrape(client))
        response = client.put("/servers/3", json={"status": "maintenance"})
        # The invalidation is `server_cache.pop(server_id, None)`: a lookup that found the entry.
        assert cache_timing(response) == 'cache;desc="1 hit 0 miss"'
        seen.append(scrape(client))
        response = client.get("/servers/3")
        assert cache_timing(response) == 'cache;desc="0 hit 1 miss"'
        assert response.json()["status"] == "maintenance"  # not the stale cached copy
        seen.append(scrape(client))
        # Right after the miss that filled it, another request invalidates it: its own lookup.
        response = client.put("/servers/3", json={"status": original})
        assert cache_timing(response) == 'cache;desc="1 hit 0 miss"'
        seen.append(scrape(client))
        return seen

    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        original = client.get("/servers/3/uncached").json()["status"]
        try:
            seen = exercise(client)
        finally:  # the database is shared by the session's tests
            client.put("/servers/3", json={"status": original})

    rates = [found.hits / (found.hits + found.misses) for found in seen[:4]]  # type: ignore[operator]
    assert rates == [0.0, 0.5, 2 / 3, 0.75]  # rising after warm-up
    assert seen[:4] == [
        Counts(hits=hits, misses=10, size=10, max_size=100) for hits in (0, 10, 20, 30)
    ]
    # Removed by the application, not evicted: the pop counts as a hit, the size drops by one
    # and the evictions do not move; the next read of that server is a miss.
    assert seen[4] == Counts(hits=31, misses=10, size=9, max_size=100)
    assert seen[5] == Counts(hits=31, misses=11, size=10, max_size=100)
    assert seen[6] == Counts(hits=32, misses=11, size=9, max_size=100)
