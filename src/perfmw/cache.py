"""cachetools caches watched per instance (placeholder until the cache source lands)."""

from __future__ import annotations

from typing import Any


def watch_cache(cache: Any, name: str, registry: Any = None) -> Any:
    return cache
