"""Helpers for the application's own tests.

with perfmw.testing.assert_max_queries(3):
    client.get("/servers")
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

from ._contexts import SyncAndAsync
from .blocking import BlockingCallError


class assert_max_queries(SyncAndAsync["assert_max_queries"]):
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

        __tracebackhide__ = True  # pytest: the failure is the test's line, not this one
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


class forbid_blocking(SyncAndAsync["forbid_blocking"]):
    """Raise `BlockingCallError` at known blocking calls made on the event loop's thread.

    with perfmw.testing.forbid_blocking():
        client.get("/servers")        # time.sleep() in an async endpoint raises there

    While the block runs, on any thread that is running an event loop: `time.sleep`, blocking
    socket I/O, `open()` from application code, `subprocess.run`/`call`/`Popen.wait` without a
    timeout, `requests`, synchronous pymongo, and acquiring (without a timeout) a
    `threading.Lock` created inside the block. Worker threads (`run_in_executor`,
    `run_in_threadpool`, `def` endpoints) may block. A violation the application swallowed
    (a server turning it into a 500) is raised again when the block exits.
    """

    __slots__ = ("_seen", "_violations")

    def __init__(self) -> None:
        self._violations: list[BlockingCallError] | None = None  # while active
        self._seen: list[BlockingCallError] = []

    @property
    def violations(self) -> list[BlockingCallError]:
        """The blocking calls caught so far."""
        return list(self._seen)

    def __enter__(self) -> forbid_blocking:
        from . import blocking

        self._violations = self._seen = blocking.enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from . import blocking

        violations = self._violations
        if violations is None:
            return
        self._violations = None
        blocking.leave(violations)
        if exc is None and violations:
            raise violations[0]


__all__ = ["BlockingCallError", "assert_max_queries", "forbid_blocking"]
