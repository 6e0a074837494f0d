"""Run by every Python process `perfmw run` starts (this directory is first on its PYTHONPATH),
before the program's own code: perfmw's launcher bootstrap, then the sitecustomize the program
would have loaded without it (a virtualenv's, another tool's)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _start_perfmw() -> None:
    try:
        from perfmw import launcher
    except Exception as exc:  # another interpreter, without perfmw: the program runs as is
        print(
            f"perfmw run: perfmw is not importable by {sys.executable} ({exc}); "
            "this process runs uninstrumented",
            file=sys.stderr,
        )
        return
    launcher.bootstrap()


def _next_sitecustomize() -> None:
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_start_perfmw()
_next_sitecustomize()
