"""What users feel: requests/s and p99 of a real uvicorn under wrk, bare and instrumented.

One uvicorn worker per set-up on 127.0.0.1, all started at once, wrk at 32 connections on each
in turn, rounds interleaved: medians, and ratios to bare paired within each round (this
machine's speed drifts by more than the budgets from one run to the next). The app is one
small JSON route, so that what the instrumentation costs is as large a share of each request
as it can be. Spans go over
OTLP/HTTP to a receiver in another process. Budgets (issue 19): perfmw (metrics, MongoDB
listeners, loop monitor; tracing off) serves at least 0.95x bare FastAPI's requests/s with a
p99 at most 1.1x bare's, and at least 0.8x with tracing on (every request sampled).
"""

from __future__ import annotations

from benchmarks._load import Runs, find_tool, interleaved, medians, paired

CONNECTIONS = 32
LOAD_SECONDS = 3
ROUNDS = 9
SETUPS = {
    "bare FastAPI": {"PERFMW_BENCH_SETUP": "bare"},
    "perfmw (tracing off)": {"PERFMW_BENCH_SETUP": "perfmw"},
    "perfmw + configure_tracing(), ratio 1.0": {
        "PERFMW_BENCH_SETUP": "perfmw-traced",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
    },
    "prometheus-fastapi-instrumentator": {"PERFMW_BENCH_SETUP": "instrumentator"},
    "OpenTelemetry FastAPI (BatchSpanProcessor, OTLP)": {"PERFMW_BENCH_SETUP": "otel"},
}
BARE, OURS, TRACED = list(SETUPS)[:3]


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


if __name__ == "__main__":
    main()
