"""Where the application's code is: the first frame that is not a library's or perfmw's.

`location` is "path:line" with the path relative to the working directory when it lies
under it (as users see it in their editor), absolute otherwise.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from types import CodeType, FrameType

# Frameworks and drivers between the application and the event it caused.
_LIBRARY_PACKAGES = (
    "perfmw",
    "pymongo",
    "motor",
    "bson",
    "gridfs",
    "starlette",
    "fastapi",
    "anyio",
    "sniffio",
    "uvicorn",
    "uvloop",
    "h11",
    "httptools",
    "pydantic",
    "pydantic_core",
    "wrapt",
    "cachetools",
    "opentelemetry",
    "prometheus_client",
    "gunicorn",
    "httpx",
    "httpcore",
    "_pytest",
    "pytest",
    "pluggy",
    "requests",
    "urllib3",
    "jinja2",
)


def _library_roots() -> tuple[str, ...]:
    roots = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib")}
    roots.add(os.path.dirname(os.__file__))
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


_STDLIB_ROOTS = _library_roots()
# perfmw itself, wherever it is installed from (an editable install is not in site-packages)
_PERFMW_ROOT = os.path.join(os.path.realpath(os.path.dirname(__file__)), "")
_is_app_cache: dict[CodeType, bool] = {}
_CACHE_LIMIT = 50_000


def _is_library_file(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen importlib>, <string>
        return not filename.startswith("<ipython")
    path = os.path.realpath(filename)
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts or "dist-packages" in parts:
        index = max(i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages"))
        top = parts[index + 1] if index + 1 < len(parts) else ""
        top = top.removesuffix(".py")
        return top in _LIBRARY_PACKAGES or top.startswith(("_", "."))
    return path.startswith(_PERFMW_ROOT) or path.startswith(_STDLIB_ROOTS)


def is_app_code(code: CodeType) -> bool:
    """Whether frames of this code object belong to the application."""
    cached = _is_app_cache.get(code)
    if cached is None:
        cached = not _is_library_file(code.co_filename)
        if len(_is_app_cache) >= _CACHE_LIMIT:
            _is_app_cache.clear()
        _is_app_cache[code] = cached
    return cached


def format_location(filename: str, lineno: int | None) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        relative = filename
    path = filename if relative.startswith("..") else relative
    return f"{path}:{lineno}"


def app_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost application frame at or above `frame`."""
    while frame is not None:
        if is_app_code(frame.f_code):
            return frame
        frame = frame.f_back
    return None


def app_location(frame: FrameType | None = None) -> str | None:
    """ "path:line" of the innermost application frame above the caller (or `frame`)."""
    found = app_frame(frame if frame is not None else sys._getframe(1))
    return None if found is None else format_location(found.f_code.co_filename, found.f_lineno)


def format_stack(frame: FrameType | None, limit: int = 30) -> tuple[str, ...]:
    """The stack from outermost to innermost, one "path:line in function" line per frame."""
    lines = [
        f"{format_location(summary.filename, summary.lineno)} in {summary.name}"
        for summary in traceback.extract_stack(frame, limit=limit)
    ]
    return tuple(lines)
