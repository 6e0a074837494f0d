"""What multiprocess mode costs per request, against single-process mode.

prometheus-client decides at import time whether its values live in mmap files, so each mode
runs in its own child process (`PROMETHEUS_MULTIPROC_DIR` set or not), measuring bare FastAPI
and the same app with perfmw in interleaved rounds (CPU time of the serving thread, medians).
Multiprocess mode moves work off the request: each worker copies its counts to its mmap file
once a second (FLUSH_SECONDS), so the table also gives that copy's cost ("flush", a background
thread's CPU once a second) and the cost of one scrape of `/metrics` in each mode.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._asgi import items_app, per_request_us


def _child() -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    import perfmw
    from perfmw.exporters.prometheus import exposition, sink_for

    registry = CollectorRegistry()
    instrumented = items_app()
    perfmw.instrument(instrumented, settings=perfmw.Settings(trace=False), registry=registry)
    medians = per_request_us({"bare": items_app(), "perfmw": instrumented})
    scrapes = []
    for _ in range(30):
        started = time.perf_counter()
        exposition(registry, "text/plain")
        scrapes.append((time.perf_counter() - started) * 1e6)
    medians["scrape"] = statistics.median(scrapes)
    # One copy to the files after more requests: the 4 changed histograms of the route.
    flushes = []
    for _ in range(30):
        per_request_us({"perfmw": instrumented}, requests=10, rounds=1)
        started = time.perf_counter()
        sink_for(registry).flush()
        flushes.append((time.perf_counter() - started) * 1e6)
    medians["flush"] = statistics.median(flushes)
    return medians


def _run_mode(multiprocess: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory() as directory:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.multiprocess", "--child"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    single = _run_mode(multiprocess=False)
    multi = _run_mode(multiprocess=True)
    added_single = single["perfmw"] - single["bare"]
    added_multi = multi["perfmw"] - multi["bare"]
    print("| mode | bare µs/request | perfmw µs/request | added µs | scrape µs | flush µs/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, medians, added in (
        ("single process", single, added_single),
        ("multiprocess (mmap files)", multi, added_multi),
    ):
        print(
            f"| {name} | {medians['bare']:.1f} | {medians['perfmw']:.1f} | {added:+.1f} "
            f"| {medians['scrape']:.0f} | {medians['flush'] if multi is medians else 0:.0f} |"
        )
    print(
        f"\nmultiprocess mode adds {added_multi - added_single:+.1f} µs per request over "
        f"single-process perfmw ({added_multi / added_single:.2f}x perfmw's own cost)."
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(_child()))
    else:
        main()
