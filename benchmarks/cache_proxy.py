"""Cost of a cache hit through `perfmw.watch_cache` against the same hit on the bare cache.

Budget (cache issue): a hit through the proxy costs at most 1 µs more than a hit on the bare
cache, measured in the same run. Each idiom runs on a bare cache and on a watched twin holding
the same entries; rounds are interleaved and the medians compared. The watched hits run inside
an open request record, as in a request (the per-request counts are part of the cost).
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache, TTLCache, cached
from prometheus_client import CollectorRegistry

import perfmw
from perfmw.record import RequestRecord, _current

BUDGET_NS = 1000.0
ROUNDS = 25
NUMBER = 20_000
KEY = 42


def idioms() -> dict[str, Callable[[Any], Callable[[], Any]]]:
    """Each idiom, as a function of the cache returning the hit to time."""

    def getitem(cache: Any) -> Callable[[], Any]:
        return lambda: cache[KEY]

    def membership_then_read(cache: Any) -> Callable[[], Any]:
        # The example app's idiom: `if key in cache: return cache[key]`.
        return lambda: KEY in cache and cache[KEY]

    def get(cache: Any) -> Callable[[], Any]:
        return lambda: cache.get(KEY)

    def decorated(cache: Any) -> Callable[[], Any]:
        @cached(cache)
        def square(n: int) -> int:
            return n * n

        return lambda: square(KEY)

    return {
        "LRUCache: cache[key]": getitem,
        "TTLCache: cache[key]": getitem,
        "TTLCache: key in cache, cache[key]": membership_then_read,
        "LRUCache: cache.get(key)": get,
        "LRUCache: @cached function": decorated,
    }


def new_cache(idiom: str) -> Any:
    cache: Any = TTLCache(maxsize=1000, ttl=3600) if idiom.startswith("TTL") else LRUCache(1000)
    for n in range(1000):
        cache[n] = n * n
    return cache


def per_hit_ns(call: Callable[[], Any]) -> float:
    return timeit.Timer(call).timeit(NUMBER) / NUMBER * 1e9


def measure() -> dict[str, tuple[float, float]]:
    """Median ns per hit, (bare, watched), per idiom."""
    registry = CollectorRegistry()
    calls: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for index, (idiom, make) in enumerate(idioms().items()):
        bare = make(new_cache(idiom))
        watched = make(perfmw.watch_cache(new_cache(idiom), f"bench{index}", registry))
        bare(), watched()  # warm: @cached stores on the first call
        calls[idiom] = (bare, watched)
    samples: dict[str, tuple[list[float], list[float]]] = {idiom: ([], []) for idiom in calls}
    token = _current.set(RequestRecord("/bench", "GET"))
    try:
        for _ in range(ROUNDS):
            for idiom, (bare, watched) in calls.items():
                samples[idiom][0].append(per_hit_ns(bare))
                samples[idiom][1].append(per_hit_ns(watched))
    finally:
        _current.reset(token)
    return {
        idiom: (statistics.median(bare), statistics.median(watched))
        for idiom, (bare, watched) in samples.items()
    }


def main() -> None:
    medians = measure()
    lines = [
        "| hit | bare ns | watched ns | added ns | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for idiom, (bare, watched) in medians.items():
        lines.append(
            f"| {idiom} | {bare:.0f} | {watched:.0f} | {watched - bare:+.0f} | "
            f"{watched / bare:.2f}x |"
        )
    print("\n".join(lines))
    worst_idiom, (bare, watched) = max(medians.items(), key=lambda item: item[1][1] - item[1][0])
    added = watched - bare
    verdict = "within" if added <= BUDGET_NS else "OVER"
    print(
        f"\nworst: {worst_idiom} adds {added:.0f} ns per hit "
        f"({verdict} the budget of {BUDGET_NS:.0f} ns)"
    )


if __name__ == "__main__":
    main()
