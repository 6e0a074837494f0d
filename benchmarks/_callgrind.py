"""Instruction counts: a benchmark's `--probe` run under valgrind's callgrind, which counts the
same whatever else the shared machine is doing (every thread of the process counted)."""

from __future__ import annotations

import re
import subprocess
import sys


def probe_instructions(module: str, *args: str) -> int:
    """Instructions that `python -m benchmarks.<module> --probe ARGS...` executed."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, "-m", f"benchmarks.{module}", "--probe", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found is not None, done.stderr[-2000:]
    return int(found[1])
