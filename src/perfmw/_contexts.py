"""Context managers that work with both `with` and `async with`."""

from __future__ import annotations

from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class SyncAndAsync(Generic[T]):
    """`async with` runs the synchronous `__enter__`/`__exit__`: nothing to await in between."""

    __slots__ = ()

    def __enter__(self) -> T:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> T:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        __tracebackhide__ = True  # pytest: only a step between the `async with` and __exit__
        self.__exit__(exc_type, exc, tb)
