"""Which loop callback a stack sample shows, and which request's record it runs for.

Read from the watchdog thread, in a sample of the loop thread's stack:
- from the asyncio handle being run (it holds the callback's context);
- from `Task.get_context()` on Python 3.12+;
- on uvloop with Python 3.10/3.11, from a map of tasks to records kept by a task factory (one
  call and one ContextVar read per task);
- else from the middleware's frame on the stack.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from types import CodeType, FrameType
from typing import Any

from ..record import RequestRecord, _current

_HANDLE_RUN: CodeType = asyncio.events.Handle._run.__code__
_COROUTINE_FLAGS = 0x80 | 0x100 | 0x200  # CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR
# Task.get_context() (3.12+) lets the watchdog read a task's request from another thread.
TASK_HAS_CONTEXT = hasattr(asyncio.Task, "get_context")


def _middleware_code() -> CodeType:
    from ..middleware import PerfMiddleware

    return PerfMiddleware.__call__.__code__


def callback_depth(frame: FrameType | None) -> int | None:
    """How deep (from the thread's outermost frame) the loop's callbacks run."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    coro = task.get_coro() if task is not None else None
    root = getattr(coro, "cr_frame", None)
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    for depth, f in enumerate(frames):
        if f is root:
            return depth
    return None


def callback_root(frames: list[FrameType], depth: int | None) -> FrameType | None:
    """The frame of the loop callback running in a sample (None: the loop's own code)."""
    if depth is not None:
        return frames[depth] if len(frames) > depth else None
    return next((f for f in frames if f.f_code.co_flags & _COROUTINE_FLAGS), None)


def record_for(frames: list[FrameType], loop: asyncio.AbstractEventLoop) -> RequestRecord | None:
    """The record in the context of the running callback (frames outermost first)."""
    for f in reversed(frames):
        if f.f_code is _HANDLE_RUN:  # asyncio: the handle holds the callback's context
            context = getattr(f.f_locals.get("self"), "_context", None)
            if context is not None:
                return context.get(_current)  # type: ignore[no-any-return]
            break
    task = asyncio.current_task(loop)
    if task is not None:
        if TASK_HAS_CONTEXT:
            return task.get_context().get(_current)  # type: ignore[attr-defined,no-any-return]
        record = _task_records.get(task)
        if record is not None:
            return record
    code = _middleware_code()
    for f in reversed(frames):
        if f.f_code is code:
            found = f.f_locals.get("record")
            return found if isinstance(found, RequestRecord) else None
    return None


# Tasks created while a request's record was current (only kept where Task.get_context()
# does not exist and the loop's handles are C objects: uvloop on Python 3.10/3.11).
_task_records: weakref.WeakKeyDictionary[asyncio.Task[Any], RequestRecord] = (
    weakref.WeakKeyDictionary()
)


def needs_task_factory(loop: asyncio.AbstractEventLoop) -> bool:
    return not TASK_HAS_CONTEXT and not isinstance(loop, asyncio.BaseEventLoop)


def recording_task_factory(previous: Any) -> Any:
    """A task factory that remembers which record each new task's context carries.

    A plain function with the loop's own signature: a task costs one call and a ContextVar read
    more (0.3 % of a tiny task's life on uvloop; `**kwargs` would cost 8 %).
    """
    Task: Any = asyncio.Task  # context= exists from Python 3.11, as the loop passes it
    current = _current
    records = _task_records

    if previous is None:

        def factory(loop: Any, coro: Any, context: Any = None) -> Any:
            if context is None:
                task = Task(coro, loop=loop)
                record = current.get()
            else:
                task = Task(coro, loop=loop, context=context)
                record = context.get(current)
            if record is not None:
                records[task] = record
            return task

    else:

        def factory(loop: Any, coro: Any, context: Any = None) -> Any:
            if context is None:
                task = previous(loop, coro)
                record = current.get()
            else:
                task = previous(loop, coro, context=context)
                record = context.get(current)
            if record is not None:
                records[task] = record
            return task

    factory.previous = previous  # type: ignore[attr-defined]
    return factory


#: The coroutine an ASGI server runs each request in (uvicorn's request cycles).
_REQUEST_CYCLES = frozenset({"run_asgi"})


def not_started(loop: asyncio.AbstractEventLoop) -> int:
    """Requests the server has read but the loop has not run yet: tasks of its request cycle
    whose coroutine has not begun (the loop reads several connections in one turn, then runs
    their requests one after the other). No middleware has seen them; each waits for the loop.
    """
    count = 0
    for task in asyncio.all_tasks(loop):
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        if (
            code is not None
            and code.co_name in _REQUEST_CYCLES
            and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED  # type: ignore[arg-type]
        ):
            count += 1
    return count
