"""What users feel: requests/s and p99 of a real uvicorn under wrk, bare and instrumented.

One uvicorn worker per set-up on 127.0.0.1, all started at once on a CPU of their own (wrk and
the receiver on the other: _load.CPUS), wrk at 32 connections on each in turn, rounds
interleaved: medians, and ratios to bare paired within each round (this machine's speed drifts
by more than the budgets from one run to the next). The app is one small JSON route, so that
what the instrumentation costs is as large a share of each request as it can be. Spans go over
OTLP/HTTP to a receiver in another process. Budgets (issue 19): perfmw (metrics, MongoDB
listeners, loop monitor; tracing off) serves at least 0.95x bare FastAPI's requests/s with a p99
at most 1.1x bare's, and at least 0.8x with tracing on (every request sampled).

Requests/s on two shared cores moves by more than those budgets from one run to the next, so
where valgrind and hey are installed the servers of bare FastAPI and perfmw are also counted in
instructions per request (callgrind, every thread of the server process, exact whatever the
machine is doing): `hey -n` sends a fixed number of requests, counted from a zeroed counter
after a warm-up. The server is CPU-bound, so requests/s goes as the inverse of that count.
Under valgrind a request runs about 50 times slower while perfmw's heartbeat keeps its 20 ms,
so it beats about 50 times as often per request as it would (its stall threshold is raised to
30 s there, or the slowed loop would be seen stalled all along): the count is, if anything, an
overestimate of perfmw's share.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks._load import (
    Runs,
    find_tool,
    interleaved,
    medians,
    paired,
    port_of,
    start_receiver,
    start_server,
    stop,
    wait_listening,
)

CONNECTIONS = 32
LOAD_SECONDS = 3
ROUNDS = 9
SETUPS = {
    "bare FastAPI": {"BENCH_SETUP": "bare"},
    "perfmw (tracing off)": {"BENCH_SETUP": "perfmw"},
    "perfmw + configure_tracing(), ratio 1.0": {
        "BENCH_SETUP": "perfmw-traced",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
    },
    "prometheus-fastapi-instrumentator": {"BENCH_SETUP": "instrumentator"},
    "OpenTelemetry FastAPI (BatchSpanProcessor, OTLP)": {"BENCH_SETUP": "otel"},
}
BARE, OURS, TRACED = list(SETUPS)[:3]
#: Requests counted under callgrind per set-up (a multiple of the connections: hey sends
#: n / c requests on each), after as many to warm up.
COUNTED = 31 * CONNECTIONS


def report(runs: Runs) -> str:
    found = {name: runs[("wrk", CONNECTIONS, name)] for name in SETUPS}
    middle = medians(runs)
    lines = [
        "| set-up | requests/s | p50 ms | p99 ms | requests/s vs bare | p99 vs bare |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for name, own in found.items():
        row = middle[("wrk", CONNECTIONS, name)]
        ratios[name] = (paired(own, found[BARE], "rps"), paired(own, found[BARE], "p99"))
        lines.append(
            f"| {name} | {row['rps']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | "
            f"{ratios[name][0]:.2f}x | {ratios[name][1]:.2f}x |"
        )
    (ours, ours_p99), (traced, _) = ratios[OURS], ratios[TRACED]
    lines.append(
        f"\nperfmw, paired per round: {ours:.2f}x bare requests/s (budget 0.95), p99 "
        f"{ours_p99:.2f}x bare (budget 1.10); with tracing on {traced:.2f}x bare requests/s "
        "(budget 0.80)"
    )
    return "\n".join(lines)


def instructions_per_request(hey: str, setups: list[str]) -> dict[str, int]:
    """Instructions the server of each set-up executed per request, COUNTED requests."""
    found = {}
    receiver, receiver_port = start_receiver()
    try:
        with tempfile.TemporaryDirectory() as directory:
            for name in setups:
                out = Path(directory) / f"{len(found)}.out"
                prefix = ("valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out}")
                env = {**SETUPS[name], "BENCH_STALL_THRESHOLD": "30"}
                server, url = start_server(env["BENCH_SETUP"], receiver_port, env, prefix)
                try:
                    wait_listening(port_of(url), server, timeout=300)
                    load = [hey, "-n", str(COUNTED), "-c", str(CONNECTIONS), url]
                    subprocess.run(load, capture_output=True, timeout=600, check=True)
                    control = ["callgrind_control", str(server.pid)]
                    subprocess.run([*control, "-z"], capture_output=True, timeout=60, check=True)
                    subprocess.run(load, capture_output=True, timeout=600, check=True)
                    subprocess.run([*control, "-d"], capture_output=True, timeout=60, check=True)
                finally:
                    stop(server)
                dump = next(Path(directory).glob(f"{out.name}.*"))
                totals = re.search(r"^(?:totals|summary): (\d+)", dump.read_text(), re.M)
                assert totals is not None, dump
                found[name] = int(totals[1]) // COUNTED
    finally:
        stop(receiver)
    return found


def instructions_report(counts: dict[str, int]) -> str:
    bare = counts[BARE]
    lines = [
        "| set-up (instructions) | per request | added to bare | requests/s it allows vs bare |",
        "|---|---:|---:|---:|",
    ]
    for name, count in counts.items():
        lines.append(f"| {name} | {count:,} | {count - bare:+,} | {bare / count:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    wrk = find_tool("wrk")
    if wrk is None:
        print("wrk not found (Debian: apt-get install wrk): end-to-end runs skipped")
        return
    loads = [("wrk", CONNECTIONS)]
    runs = interleaved(SETUPS, loads, {"wrk": wrk}, ROUNDS, LOAD_SECONDS)
    print(
        f"{ROUNDS} interleaved rounds of {LOAD_SECONDS} s per set-up, wrk "
        f"-t1 -c{CONNECTIONS}, each set-up in its own uvicorn (1 worker)\n"
    )
    print(report(runs))
    hey = find_tool("hey")
    if hey is None or shutil.which("valgrind") is None:
        print("\nvalgrind or hey not found: instructions per request not counted")
        return
    print(f"\nthe same servers under callgrind, {COUNTED} requests by hey -c{CONNECTIONS}\n")
    print(instructions_report(instructions_per_request(hey, [BARE, OURS, TRACED])))


if __name__ == "__main__":
    main()
