"""Helpers for the application's own tests.

with perfmw.testing.assert_max_queries(3):
    client.get("/servers")
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

# --- assert_max_queries (MongoDB source) ---


class assert_max_queries:
    """Fail when the block sends more than `n` MongoDB queries; the error lists them.

    with perfmw.testing.assert_max_queries(3):
        client.get("/servers")
    async with perfmw.testing.assert_max_queries(3):
        await client.get("/servers")

    Every application command the process sends while the block runs counts, from any
    thread: Starlette's TestClient serves the app in another thread, with its own context.
    Housekeeping (hello, ping...) is not counted and getMores belong to their query.
    """

    __slots__ = ("_seen", "max_queries")

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"assert_max_queries() needs an integer >= 0, got {n!r}")
        self.max_queries = n
        self._seen: list[Any] = []

    @property
    def queries(self) -> list[Any]:
        """The queries seen so far (each with operation, collection, shape, location)."""
        return list(self._seen)

    def __enter__(self) -> assert_max_queries:
        from . import mongo

        mongo.register_listeners()
        self._seen = []
        mongo._watchers.append(self._seen)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from . import mongo

        with contextlib.suppress(ValueError):
            mongo._watchers.remove(self._seen)
        if exc_type is not None or len(self._seen) <= self.max_queries:
            return
        lines = [
            f"  {i}. {q.shape}  at {q.location or 'unknown location'}"
            for i, q in enumerate(self._seen, 1)
        ]
        raise AssertionError(
            f"expected at most {self.max_queries} MongoDB queries, {len(self._seen)} were sent:\n"
            + "\n".join(lines)
        )

    async def __aenter__(self) -> assert_max_queries:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


# --- forbid_blocking (event loop source) ---
