"""Call sites: the application's own line, the library it called, paths as their owner sees them."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import pytest

from perfmw import _frames
from perfmw._frames import NOWHERE, CallSite, call_site, display_path, format_stack
from support import line_of

LIBRARY = '''
import sys


def innermost():
    return sys._getframe()


def entry(callback=None):
    """What the application calls: a public function that calls deeper library code."""
    return callback() if callback else innermost()
'''


@pytest.fixture
def site_packages(tmp_path: Path) -> Iterator[Path]:
    """A site-packages folder on sys.path holding a library package `vendorlib`."""
    root = tmp_path / "venv" / "lib" / "python3" / "site-packages"
    (root / "vendorlib").mkdir(parents=True)
    (root / "vendorlib" / "__init__.py").write_text("")
    (root / "vendorlib" / "low_level.py").write_text(LIBRARY)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] == "vendorlib"]:
            del sys.modules[name]


def vendorlib() -> ModuleType:
    return importlib.import_module("vendorlib.low_level")


def test_any_library_under_site_packages_is_not_the_application(site_packages: Path) -> None:
    site = call_site(vendorlib().entry())  # the application's line
    assert site == CallSite(
        line_of(__file__, "# the application's line"), "vendorlib.low_level.entry"
    )


def test_a_callback_the_library_calls_back_is_the_innermost_application_frame(
    site_packages: Path,
) -> None:
    def app_callback() -> FrameType:
        return sys._getframe()  # the callback's line

    assert call_site(vendorlib().entry(app_callback)) == CallSite(
        line_of(__file__, "# the callback's line"), None
    )


def test_perfmw_frames_are_skipped_and_never_named() -> None:
    source = "import sys\nfrom perfmw._frames import call_site\nsite = call_site(sys._getframe())"
    inside = compile(source, _frames._PERFMW_ROOT + "x.py", "exec")
    scope: dict[str, CallSite] = {}
    exec(inside, scope)  # perfmw's own code, called from here
    assert scope["site"] == CallSite(line_of(__file__, "# perfmw's own code"), None)
    assert call_site(None) == NOWHERE


def test_a_suspended_chain_of_coroutines_is_located_like_a_stack(site_packages: Path) -> None:
    def chain(innermost: FrameType) -> list[FrameType]:
        """The frames up to this test's, outermost first, as a suspended task's awaits are."""
        entry = innermost.f_back
        assert entry is not None and entry.f_back is not None
        return [entry.f_back, entry, innermost]

    site = _frames.chain_site(chain(vendorlib().entry()))  # the chain's application line
    assert site == CallSite(
        line_of(__file__, "# the chain's application line"), "vendorlib.low_level.entry"
    )
    assert _frames.chain_site(chain(vendorlib().entry())[1:]) == NOWHERE


def test_with_no_application_frame_via_names_the_innermost_library_function(
    site_packages: Path,
) -> None:
    frame = vendorlib().entry()
    saved = dict(_frames._origins)
    f: FrameType | None = frame.f_back
    while f is not None:  # every frame above the library's counted as library code too
        _frames._origins[f.f_code.co_filename] = _frames._LIBRARY
        f = f.f_back
    try:
        assert call_site(frame) == CallSite(None, "vendorlib.low_level.innermost")
    finally:
        _frames._origins.clear()
        _frames._origins.update(saved)


def test_paths_are_relative_never_absolute(site_packages: Path) -> None:
    assert display_path(os.path.abspath(__file__)) == os.path.join("tests", "test_frames.py")
    library = str(site_packages / "vendorlib" / "low_level.py")
    assert display_path(library) == os.path.join("vendorlib", "low_level.py")
    assert display_path(json.__file__) == os.path.join("json", "__init__.py")
    elsewhere = os.path.join(os.sep, "opt", "srv", "app", "main.py")
    assert display_path(elsewhere) == os.path.join("app", "main.py")
    assert display_path("<frozen importlib._bootstrap>") == "<frozen importlib._bootstrap>"
    frame = vendorlib().entry()
    assert not any(line.startswith(os.sep) for line in format_stack(frame))
    assert format_stack(frame)[-1] == f"{os.path.join('vendorlib', 'low_level.py')}:6 in innermost"


def test_the_stack_is_cut_to_its_innermost_frames() -> None:
    def recurse(n: int) -> FrameType:
        return recurse(n - 1) if n else sys._getframe()

    stack = format_stack(recurse(50), limit=30)
    assert len(stack) == 30
    assert all(line.endswith(" in recurse") for line in stack)


def test_an_application_installed_in_site_packages_is_claimed_by_instrument(
    site_packages: Path,
) -> None:
    (site_packages / "myservice").mkdir()
    (site_packages / "myservice" / "__init__.py").write_text("")
    (site_packages / "myservice" / "main.py").write_text(
        "import sys\n\nimport vendorlib.low_level\n\n\n"
        "def handler():\n    return vendorlib.low_level.entry()\n\n\n"
        "def here():\n    return sys._getframe()\n"
    )
    main = importlib.import_module("myservice.main")
    try:
        # Under site-packages, it looks like a library: the test calling it is the application.
        assert call_site(main.handler()) == CallSite(  # the test calling it
            line_of(__file__, "# the test calling it"), "myservice.main.handler"
        )
        _frames.claim_application(main.here())  # what instrument() does with its caller
        assert call_site(main.handler()) == CallSite(
            f"{os.path.join('myservice', 'main.py')}:7", "vendorlib.low_level.entry"
        )
    finally:
        _frames._app_roots = ()
        _frames._origins.clear()
        del sys.modules["myservice.main"], sys.modules["myservice"]


def test_the_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_frames, "_CACHE_LIMIT", 10)
    monkeypatch.setattr(_frames, "_MAX_FILES", 10)
    codes = [compile("x", f"/srv/app/generated_{i}.py", "eval") for i in range(25)]
    for code in codes:
        assert _frames.is_app_code(code)
        assert _frames._code(code).code is code
        display_path(code.co_filename)
        assert _frames.loop_lines(code) == frozenset()  # no source: no loop known
    assert len(_frames._codes) <= 10
    assert len(_frames._origins) <= 10
    assert len(_frames._display_cache) <= 10
    assert 0 < len(_frames._loops_cache) <= 10


def _looping(items: list[int]) -> int:
    total = 0
    for item in sorted(items):  # header: runs once
        total += item  # for body
    else:
        total += 1  # else: runs once
    while total > 100:
        total -= 1  # while body

    def nested() -> int:
        for _ in items:
            pass  # nested function: its own code object
        return 0

    squares = [
        item * item  # comprehension
        for item in items
    ]
    return total + sum(squares) + nested()


def test_loop_lines_are_the_lines_that_repeat() -> None:
    here = Path(__file__)
    lines = _frames.loop_lines(_looping.__code__)

    def number(marker: str) -> int:
        return int(line_of(here, marker).rsplit(":", 1)[1])

    for repeated in ("# for body", "# while body", "# comprehension"):
        assert number(repeated) in lines, repeated
    for once in ("# header: runs once", "# else: runs once", "# nested function"):
        assert number(once) not in lines, once
    assert _frames.loop_lines(_frames.display_path.__code__) == frozenset()
    nested = next(c for c in _looping.__code__.co_consts if getattr(c, "co_name", "") == "nested")
    assert _frames.loop_lines(nested) == {number("# nested function")}  # its loop is its own


def test_a_parse_that_another_threads_parse_broke_is_parsed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPython 3.11's parser can raise SystemError when two threads parse at once (gh-106905):
    that says nothing about the file, so the loop lines are read again rather than lost."""
    here = Path(__file__)
    body = int(line_of(here, "# for body").rsplit(":", 1)[1])
    parse = _frames.ast.parse
    failures = {"left": 1}

    def flaky(source: str) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise SystemError("AST constructor recursion depth mismatch (before=96, after=72)")
        return parse(source)

    monkeypatch.setattr(_frames, "_loops_cache", {})
    monkeypatch.setattr(_frames.ast, "parse", flaky)
    assert body in _frames.loop_lines(_looping.__code__)  # the second attempt read it

    failures["left"] = 3  # every attempt of this call fails: nothing known, nothing cached
    monkeypatch.setattr(_frames, "_loops_cache", {})
    assert _frames.loop_lines(_looping.__code__) == frozenset()
    assert _frames._loops_cache == {}
    assert body in _frames.loop_lines(_looping.__code__)  # the next call parses it
