"""`perfmw run PROGRAM [ARGS...]`: start a server with perfmw in it, no code in the application.

    perfmw run uvicorn myapp:app --port 8000
    perfmw run gunicorn -k uvicorn.workers.UvicornWorker -w 4 myapp:app
    python -m perfmw run ...

The launcher convention of `opentelemetry-instrument` and `ddtrace-run`: the program is
executed in place of this process (its exit status and signals are its own) with perfmw's
`_bootstrap` directory first on PYTHONPATH. Its `sitecustomize` runs `bootstrap()` in every
Python process of the program, the workers a server spawns or forks included, before any of
the application's code:

- the pymongo listeners are registered, so a client built when the app module is imported is
  observed;
- the settings are read from the environment (`Settings.from_env()`);
- a Starlette or FastAPI application is instrumented when it is first served: when it builds
  its middleware stack, which Starlette does lazily at its first call (the lifespan startup,
  or the first request). The app the server serves is found however it is named or built
  (a module attribute, a factory), and an app mounted inside an instrumented one is left
  alone: it builds its stack during one of the outer app's requests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from . import _bootstrap, _guard
from .settings import Settings

USAGE = "usage: perfmw run PROGRAM [ARGS...], e.g. perfmw run uvicorn myapp:app"
BOOTSTRAP_DIR = os.path.dirname(os.path.abspath(_bootstrap.__file__))
_GUARD = _guard.guard("launcher")


class LaunchError(Exception):
    """The program cannot be started: a usage error, said in one line."""


def main(argv: Sequence[str]) -> int:
    """`perfmw run`: exec the program (no return) or say in one line why not (exit 2)."""
    try:
        path, args, env = prepare(argv)
    except LaunchError as exc:
        print(f"perfmw run: {exc}", file=sys.stderr)
        return 2
    if path is None:  # -h
        print(USAGE)
        return 0
    if os.name == "nt":  # no exec there that keeps the caller's exit status
        return subprocess.call(args, executable=path, env=env)
    try:
        os.execve(path, args, env)
    except OSError as exc:
        print(f"perfmw run: cannot execute {args[0]}: {exc.strerror or exc}", file=sys.stderr)
    return 2


def prepare(argv: Sequence[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """The executable, its argv and its environment; LaunchError for a usage error."""
    if not argv:
        raise LaunchError(f"no program given; {USAGE}")
    if argv[0] in ("-h", "--help"):
        return None, [], {}
    program = argv[0]
    # The program is looked for on PATH, then beside this interpreter (a virtualenv's bin
    # directory, when `.venv/bin/perfmw` is run without activating it).
    path = shutil.which(program) or shutil.which(
        program, path=os.path.dirname(os.path.abspath(sys.executable))
    )
    if path is None:
        raise LaunchError(f"program not found: {program}")
    try:
        Settings.from_env()  # loud now rather than in each worker
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    env = dict(os.environ)
    entries = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e and e != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *entries])
    return path, list(argv), env


def bootstrap() -> None:
    """In each Python process `perfmw run` starts, before the program: listeners, app hook."""
    with _GUARD:
        settings = Settings.from_env()
        from . import mongo

        mongo.register_listeners()
        _instrument_when_served(settings)


def _instrument_when_served(settings: Settings) -> None:
    """Instrument each outermost Starlette app when it builds its middleware stack.

    The builder is hooked on Starlette and on each subclass that defines its own (FastAPI
    does, without calling Starlette's), those defined later included: nothing is added to
    a request's path, only to the one call that builds the stack.
    """
    from starlette.applications import Starlette

    if getattr(Starlette, "_perfmw_launcher", False):
        return
    Starlette._perfmw_launcher = True  # type: ignore[attr-defined]
    pending = [Starlette]
    while pending:
        cls = pending.pop()
        _hook_builder(cls, settings)
        pending.extend(cls.__subclasses__())
    chained = Starlette.__dict__.get("__init_subclass__")

    def init_subclass(cls: type[Starlette], /, **kwargs: Any) -> None:
        if chained is not None:
            chained.__func__(cls, **kwargs)
        else:
            super(Starlette, cls).__init_subclass__(**kwargs)
        _hook_builder(cls, settings)

    Starlette.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment]


def _hook_builder(cls: type[Any], settings: Settings) -> None:
    from .perf import _STATE_KEY, instrument
    from .record import current_request

    build = cls.__dict__.get("build_middleware_stack")
    if build is None or getattr(build, "perfmw_launcher", False):
        return  # inherited: the class it comes from is hooked

    def build_middleware_stack(self: Any) -> Any:
        # An app built during a measured request is mounted in one: the outer app measures it.
        if getattr(self, _STATE_KEY, None) is None and current_request() is None:
            instrumented = False
            with _GUARD:
                instrument(self, settings=settings)
                instrumented = True
            if instrumented:
                # instrument() put its own builder on the app, which calls this one again.
                return self.build_middleware_stack()
        return build(self)

    build_middleware_stack.perfmw_launcher = True  # type: ignore[attr-defined]
    cls.build_middleware_stack = build_middleware_stack
