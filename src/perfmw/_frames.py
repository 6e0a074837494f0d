"""Call sites: the application's own line behind an event, and the library code it went through.

Every finding kind is located here, the same way: at the innermost frame of the application's
own code. Library frames (anything under site-packages or dist-packages, the standard library,
perfmw itself) stay in the stack and are named in the evidence as `via argon2.low_level.verify`:
the library function the application's line called.

Paths are shown as the application's owner sees them: relative to the working directory when
the file lies under it, else relative to the `sys.path` entry that holds it
(`argon2/low_level.py`), never as an absolute path of the machine.

An application installed into site-packages (`pip install .` in its image) is still the
application: `instrument()` claims the top-level package of the module that called it. A
company's own shared packages that live beside the application (a repository layer, a common
database package) count as library code when the `library_paths` setting names them: findings
then name the line that called them, with `via` naming their function.
"""

from __future__ import annotations

import ast
import importlib.util
import linecache
import os
import sys
import sysconfig
import threading
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import NamedTuple, TypeVar

_LIBRARY_DIRS = ("site-packages", "dist-packages")
_CACHE_LIMIT = 50_000  # code objects and file names remembered (cleared when full)
_K = TypeVar("_K")
_V = TypeVar("_V")


def _stdlib_roots() -> tuple[str, ...]:
    roots = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib")}
    roots.add(os.path.dirname(os.__file__))
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


_STDLIB_ROOTS = _stdlib_roots()
# perfmw itself, wherever it is installed from (an editable install is not in site-packages)
_PERFMW_ROOT = os.path.join(os.path.realpath(os.path.dirname(__file__)), "")
_app_roots: tuple[str, ...] = ()  # application packages that live in site-packages
_library_roots: tuple[str, ...] = ()  # the application's own packages named by library_paths
_display_cache: dict[str, str] = {}


class CallSite(NamedTuple):
    """Where the application caused an event."""

    location: str | None  # "path:line" of the innermost application frame
    via: str | None  # "module.function" of the library code that line called, if any
    # With `in_loop`: the application's lines from the innermost one that lies inside a loop
    # down to `location` (outermost first); empty when no application line is in a loop.
    chain: tuple[str, ...] = ()


NOWHERE = CallSite(None, None)
_new_site = tuple.__new__  # a NamedTuple's own __new__ is Python code: three times slower


_APP, _LIBRARY, _PERFMW = 0, 1, 2


def _origin_of_file(filename: str) -> int:
    if filename.startswith("<"):  # <frozen importlib>, <string>
        return _APP if filename.startswith("<ipython") else _LIBRARY
    path = os.path.realpath(filename)
    if path.startswith(_library_roots):
        return _LIBRARY
    if path.startswith(_app_roots):
        return _APP
    if path.startswith(_PERFMW_ROOT):
        return _PERFMW
    if path.startswith(_STDLIB_ROOTS):
        return _LIBRARY
    parts = path.replace("\\", "/").split("/")
    return _LIBRARY if any(part in _LIBRARY_DIRS for part in parts) else _APP


# Whose each file is, by its name: every walk asks it of every frame, and a file name (shared
# by its code objects) keeps its own hash.
_origins: dict[str, int] = {}


def remember(cache: dict[_K, _V], key: _K, value: _V, limit: int | None = None) -> _V:
    """`value`, stored in `cache` under `key` (the cache emptied first when it holds `limit`
    entries, by default `_CACHE_LIMIT`)."""
    if len(cache) >= (_CACHE_LIMIT if limit is None else limit):
        cache.clear()
    cache[key] = value
    return value


def _file_origin(filename: str) -> int:
    origin = _origins.get(filename)
    return remember(_origins, filename, _origin_of_file(filename)) if origin is None else origin


class _Code:
    """What the walks need of one application or library code object, worked out on first
    use: its path as shown, its "module.function" name and its loops' lines."""

    __slots__ = ("code", "loops", "name", "path", "sites")

    def __init__(self, code: CodeType) -> None:
        self.code = code  # keeps the code object alive, so its id() is not reused meanwhile
        self.path: str | None = None
        self.name: str | None = None
        self.loops: frozenset[int] | None = None
        # Instruction offset -> ("path:line", line): reading a frame's f_lineno decodes its
        # code's line table up to the instruction (0.1 to 0.4 µs in a long function).
        self.sites: dict[int, tuple[str, int]] = {}


# Keyed by id(): a code object's own hash reads its bytecode and constants (0.3 µs and more per
# lookup, on every frame of every walk).
_codes: dict[int, _Code] = {}


def _code(code: CodeType) -> _Code:
    known = _codes.get(id(code))
    if known is not None and known.code is code:
        return known
    return remember(_codes, id(code), _Code(code))


def _origin(code: CodeType) -> int:
    return _file_origin(code.co_filename)


def _path(known: _Code) -> str:
    path = known.path
    if path is None:
        path = known.path = display_path(known.code.co_filename)
    return path


def _site(known: _Code, frame: AnyFrame) -> tuple[str, int]:
    """ "path:line" of `frame`, and its line."""
    site = known.sites.get(frame.f_lasti)
    if site is None:
        lineno = frame.f_lineno
        site = known.sites[frame.f_lasti] = (f"{_path(known)}:{lineno}", lineno)
    return site


def _name(known: _Code, frame: AnyFrame) -> str:
    name = known.name
    if name is None:
        name = known.name = function_name(frame)
    return name


def is_app_code(code: CodeType) -> bool:
    """Whether frames of this code object belong to the application."""
    return _origin(code) == _APP


def claim_application(frame: FrameType | None) -> None:
    """Count the top-level package of `frame`'s module as application code.

    `instrument()` calls this with its caller: an application installed into site-packages
    would otherwise have no frame of its own.
    """
    global _app_roots
    if frame is None:
        return
    path = os.path.realpath(frame.f_code.co_filename)
    parts = path.replace("\\", "/").split("/")
    found = [i for i, part in enumerate(parts) if part in _LIBRARY_DIRS]
    if not found or found[-1] + 1 >= len(parts) or path.startswith(_PERFMW_ROOT):
        return
    top = parts[found[-1] + 1]
    root = "/".join([*parts[: found[-1] + 1], top.removesuffix(".py")])
    root = root + ("" if top.endswith(".py") else "/")
    if root not in _app_roots:
        _app_roots = (*_app_roots, root)
        _origins.clear()


def library_root(entry: str) -> str | None:
    """Where a `library_paths` entry lives: a directory or file (absolute, or relative to the
    working directory), else an importable package or module by its dotted name; None when it
    is neither."""
    if os.path.exists(entry):
        path = os.path.realpath(entry)
        return os.path.join(path, "") if os.path.isdir(path) else path
    if not all(part.isidentifier() for part in entry.split(".")):
        return None
    try:
        spec = importlib.util.find_spec(entry)  # imports the parents of a dotted name, not it
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return os.path.join(os.path.realpath(next(iter(spec.submodule_search_locations))), "")
    return os.path.realpath(spec.origin) if spec.origin and os.path.isabs(spec.origin) else None


def count_as_library(entries: Iterable[str]) -> None:
    """Count the code under each `library_paths` entry as library code, process-wide."""
    global _library_roots
    roots = [root for root in map(library_root, entries) if root is not None]
    added = tuple(root for root in dict.fromkeys(roots) if root not in _library_roots)
    if added:
        _library_roots = (*_library_roots, *added)
        _origins.clear()
        _display_cache.clear()


def display_path(filename: str) -> str:
    """`filename` as its owner sees it: relative to the working directory or its sys.path entry."""
    shown = _display_cache.get(filename)
    return remember(_display_cache, filename, _relative(filename)) if shown is None else shown


def _relative(filename: str) -> str:
    if filename.startswith("<") or not os.path.isabs(filename):
        return filename
    roots = [os.path.abspath(entry) for entry in sys.path if entry]
    roots += [root.rstrip(os.sep) for root in _STDLIB_ROOTS]
    root = max((r for r in roots if filename.startswith(os.path.join(r, ""))), key=len, default="")
    library = _origin_of_file(filename) != _APP
    if root and library:  # starlette/routing.py, asyncio/tasks.py
        return os.path.relpath(filename, root)
    try:
        here = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        here = ".."
    if not here.startswith(".."):
        return here
    if root:
        return os.path.relpath(filename, root)
    # Outside every root: the file and its folder say enough, the machine's layout does not.
    return os.path.join(*filename.split(os.sep)[-2:])


def format_location(filename: str, lineno: int | None) -> str:
    return f"{display_path(filename)}:{lineno}"


class Still:
    """A frame as it was when read: what `call_site` and `format_stack` look at of one.

    Another thread's frames move on whenever the reading thread lets the GIL go (resolving a
    path does): read them first with `snapshot`, make sense of them after.
    """

    __slots__ = ("f_back", "f_code", "f_globals", "f_lasti", "f_lineno")

    def __init__(self, frame: FrameType, back: Still | None) -> None:
        self.f_code = frame.f_code
        self.f_lasti = frame.f_lasti
        self.f_lineno = frame.f_lineno
        self.f_globals = frame.f_globals
        self.f_back = back


AnyFrame = FrameType | Still


def snapshot(frames: list[FrameType], limit: int = 256) -> Still | None:
    """The innermost `limit` of `frames` (innermost first, each called by the next) as they are
    now."""
    still: Still | None = None
    for frame in reversed(frames[:limit]):
        still = Still(frame, still)
    return still


def function_name(frame: AnyFrame) -> str:
    """ "module.function" of a frame (`argon2.low_level.verify_secret`)."""
    code = frame.f_code
    module = frame.f_globals.get("__name__")
    name = getattr(code, "co_qualname", code.co_name)
    return f"{module}.{name}" if isinstance(module, str) else name


def call_site(frame: AnyFrame | None, in_loop: bool = False) -> CallSite:
    """The innermost application frame at or above `frame`, and the library code it called.

    With no application frame (a stall in a framework's own code), the location is unknown and
    `via` names the innermost library function. perfmw's own frames are never named. With
    `in_loop`, `chain` leads from the application line that loops down to `location`.
    """
    start = frame
    below: AnyFrame | None = None  # the latest library frame seen, called by the next frame up
    origins = _origins.get  # `_file_origin` inlined: this runs for every frame of every walk
    while frame is not None:
        code = frame.f_code
        origin = origins(code.co_filename)
        if origin is None:
            origin = _file_origin(code.co_filename)
        if origin == _APP:
            known = _codes.get(id(code))  # `_code` inlined, as above
            if known is None or known.code is not code:
                known = _code(code)
            location, lineno = known.sites.get(frame.f_lasti) or _site(known, frame)
            via = None
            if below is not None:
                below_code = _code(below.f_code)
                via = below_code.name or _name(below_code, below)
            chain: tuple[str, ...] = ()
            if in_loop:
                loops = known.loops
                if loops is None:
                    loops = _loops(known)
                # Most often this line loops itself; else the lines that called it are read.
                chain = (location,) if lineno in loops else _loop_chain(frame, location)
            return _new_site(CallSite, (location, via, chain))
        if origin == _LIBRARY:
            below = frame
        frame = frame.f_back
    return CallSite(None, None if below is None else function_name(_innermost_library(start)))


def _innermost_library(frame: AnyFrame | None) -> AnyFrame:
    """The innermost library frame at or above `frame` (there is one)."""
    while frame is not None and _origin(frame.f_code) != _LIBRARY:
        frame = frame.f_back
    assert frame is not None
    return frame


def chain_site(frames: list[FrameType], in_loop: bool = False) -> CallSite:
    """`call_site` of a chain listed outermost first (a suspended task's coroutines)."""
    site = call_site(snapshot(frames[::-1]), in_loop)
    return site if site.location is not None else NOWHERE


# Loops: which application line repeats the call (an N+1 names the loop, not the helper it calls)

_MAX_CHAIN = 16  # application frames looked at above the innermost one
_MAX_OUTSIDE = 4  # library frames between two application frames of one chain
_COMPREHENSIONS = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"})
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_loops_cache: dict[str, dict[int, tuple[str, frozenset[int]]]] = {}  # see _file_loops
_MAX_FILES = 1024
_parse_lock = threading.Lock()


def _loop_chain(frame: AnyFrame, location: str) -> tuple[str, ...]:
    """The application frames from the innermost one above `frame` whose line is inside a loop
    of its own function down to `frame` (at `location`), as "path:line" (outermost first); ()
    when none loops."""
    above: list[str] = []
    current = frame.f_back
    outside = 0  # library frames in a row: a decorator or a dependency is a few, a framework more
    while current is not None and len(above) < _MAX_CHAIN and outside <= _MAX_OUTSIDE:
        if _origin(current.f_code) != _APP:
            outside += 1
        else:
            outside = 0
            known = _code(current.f_code)
            here, lineno = _site(known, current)
            above.append(here)
            if lineno in _loops(known):
                return (*reversed(above), location)
        current = current.f_back
    return ()


def _loops(known: _Code) -> frozenset[int]:
    loops = known.loops
    if loops is None:
        loops = known.loops = loop_lines(known.code)
    return loops


def loop_lines(code: CodeType) -> frozenset[int]:
    """The lines of `code`'s function that run once per iteration of one of its loops (`for`,
    `while`, `async for` bodies, comprehensions; a comprehension with a code object of its own
    is a loop throughout). Read from the source: `call_site` keeps them per code object."""
    if code.co_name in _COMPREHENSIONS:
        return frozenset(line for _start, _end, line in code.co_lines() if line is not None)
    name, lines = _file_loops(code.co_filename).get(
        0 if code.co_name == "<module>" else code.co_firstlineno, ("", frozenset())
    )
    return lines if name == code.co_name else frozenset()


def _file_loops(filename: str) -> dict[int, tuple[str, frozenset[int]]]:
    """Each function of a file and its repeating lines, by the lines its code object may start
    at (its `def`, its decorators; 0 for the module's own code). The file is parsed
    once and its tree dropped: a module's tree is megabytes of objects that every full garbage
    collection would walk again."""
    found = _loops_cache.get(filename)
    if found is None:
        found = _read_file_loops(filename)
        if found is None:
            return {}  # not parsed this time: tried again next time
        if len(_loops_cache) >= _MAX_FILES:
            _loops_cache.clear()
        _loops_cache[filename] = found
    return found


def _read_file_loops(filename: str) -> dict[int, tuple[str, frozenset[int]]] | None:
    source = "".join(linecache.getlines(filename))
    if not source:
        return {}
    tree = None
    for _ in range(3):
        try:
            # One parse at a time: CPython 3.11 can fail two parses running in two threads
            # ("AST constructor recursion depth mismatch", a SystemError: gh-106905), and
            # queries are located from motor's and the threadpool's threads too. A parse
            # elsewhere in the process (the application's, a test runner's) can still meet
            # ours: that SystemError says nothing about the file, so it is parsed again.
            with _parse_lock:
                tree = ast.parse(source)
            break
        except (SyntaxError, ValueError):
            return {}
        except SystemError:
            continue
    if tree is None:
        return None
    found = {0: ("<module>", _repeating(tree))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = (node.name, _repeating(node))
            for first in (node.lineno, *(d.lineno for d in node.decorator_list)):
                found[first] = function
    return found


def _repeating(scope: ast.AST) -> frozenset[int]:
    """The lines of `scope`'s own code (not its nested functions and classes) inside a loop."""
    found: set[int] = set()
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, _SCOPES):
            continue  # its own code object
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)) and node.body:
            # The body repeats; the header's iterable and the else clause run once.
            found.update(range(node.body[0].lineno, (node.body[-1].end_lineno or 0) + 1))
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            found.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        todo.extend(ast.iter_child_nodes(node))
    return frozenset(found)


def app_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost application frame at or above `frame`."""
    while frame is not None:
        if is_app_code(frame.f_code):
            return frame
        frame = frame.f_back
    return None


def app_location(frame: FrameType | None = None) -> str | None:
    """ "path:line" of the innermost application frame above the caller (or `frame`)."""
    return call_site(frame if frame is not None else sys._getframe(1)).location


def format_stack(frame: AnyFrame | None, limit: int = 30) -> tuple[str, ...]:
    """The innermost `limit` frames, outermost first, one "path:line in function" line each."""
    lines: list[str] = []
    while frame is not None and len(lines) < limit:
        code = frame.f_code
        lines.append(f"{format_location(code.co_filename, frame.f_lineno)} in {code.co_name}")
        frame = frame.f_back
    lines.reverse()
    return tuple(lines)
