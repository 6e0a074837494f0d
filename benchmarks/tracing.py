"""Tracing's cost: per request in-process, and tail latency under load on a real uvicorn.

In-process (the ASGI app called directly, interleaved rounds, medians). Budgets (issue 6):
perfmw with tracing on (SDK provider, dropping exporter) adds at most half of what
OpenTelemetry's FastAPI instrumentation adds; an unsampled request (parent-based ratio
sampler at 0.1) costs within 3 µs of tracing off.

Under load (wrk and hey, concurrency 1 and 32, against uvicorn in its own process, spans
exported over OTLP/HTTP to a receiver in another process): `configure_tracing()`'s set-up keeps
p99 within 2x of tracing off. OpenTelemetry's default BatchSpanProcessor is shown beside it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import perfmw
from benchmarks._asgi import items_app, per_request_us, table
from benchmarks._load import LOADERS, find_tool, interleaved, medians

UNSAMPLED_PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
LOAD_SECONDS = 3


class WithHeader:
    """Adds one request header (a traceparent) before the app sees the request."""

    def __init__(self, app: Any, name: bytes, value: bytes) -> None:
        self.app = app
        self.header = (name, value)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope["headers"] = [*scope["headers"], self.header]
        await self.app(scope, receive, send)


def providers() -> dict[str, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    def provider(sampler: Any = None) -> TracerProvider:
        made = TracerProvider(sampler=sampler)
        made.add_span_processor(SimpleSpanProcessor(Dropping()))
        return made

    # A dropped request runs the same code whatever the rate: the root case is measured with
    # the rate at 0 (every root dropped, the SDK's default id generator), the remote-parent
    # case with the rate at 0.1 and an unsampled traceparent.
    return {
        "sampled": provider(),
        "ratio": provider(ParentBased(TraceIdRatioBased(0.1))),
        "ratio-unsampled-roots": provider(ParentBased(TraceIdRatioBased(0.0))),
    }


def variants() -> dict[str, Any]:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    made = providers()

    def perfmw_app(trace: bool, provider: Any = None) -> FastAPI:
        app = items_app()
        perfmw.instrument(
            app,
            settings=perfmw.Settings(trace=trace),
            registry=CollectorRegistry(),
            tracer_provider=provider,
        )
        return app

    otel = items_app()
    FastAPIInstrumentor.instrument_app(otel, tracer_provider=made["sampled"])
    header = (b"traceparent", UNSAMPLED_PARENT)
    return {
        "bare FastAPI": items_app(),
        "perfmw, tracing off": perfmw_app(False),
        "perfmw, tracing on": perfmw_app(True, made["sampled"]),
        "OpenTelemetry FastAPI": otel,
        "perfmw, unsampled root (ratio sampler)": perfmw_app(True, made["ratio-unsampled-roots"]),
        "perfmw, tracing off + traceparent": WithHeader(perfmw_app(False), *header),
        "perfmw, unsampled parent (ratio 0.1)": WithHeader(
            perfmw_app(True, made["ratio"]), *header
        ),
    }


def in_process() -> None:
    medians = per_request_us(variants())
    print(table(medians, "bare FastAPI"))
    bare = medians["bare FastAPI"]
    off = medians["perfmw, tracing off"]
    ours = medians["perfmw, tracing on"] - bare
    otel = medians["OpenTelemetry FastAPI"] - bare
    root = medians["perfmw, unsampled root (ratio sampler)"] - off
    parent = (
        medians["perfmw, unsampled parent (ratio 0.1)"]
        - medians["perfmw, tracing off + traceparent"]
    )
    print(
        f"\nperfmw with tracing on adds {ours:.1f} µs/request, {ours / otel:.2f} of "
        f"OpenTelemetry FastAPI's {otel:.1f} µs (budget 0.50); "
        f"of which tracing {medians['perfmw, tracing on'] - off:.1f} µs"
    )
    print(
        f"unsampled: root {root:+.1f} µs, remote parent {parent:+.1f} µs "
        "against tracing off (budget 3.0)"
    )


SETUPS = {
    "perfmw": "perfmw, tracing off",
    "perfmw-traced": "perfmw + configure_tracing()",
    "otel-batch": "perfmw + OTel BatchSpanProcessor",
}
#: (tool, connections) of each load run; the budget is read from the first two. wrk measures
#: to the microsecond with a light client, what concurrency 1 needs. At 32 connections wrk's
#: p99 is mostly its coordinated-omission correction applied to the start of the run, when
#: uvicorn (uvloop) takes the 32 new connections in one per loop iteration; hey reports each
#: request's own latency, which a packet capture matched to 0.1 ms (docs/tracing.md).
LOAD_RUNS = (("wrk", 1), ("hey", 32), ("wrk", 32))
BUDGET_RUNS = LOAD_RUNS[:2]


def under_load(tools: dict[str, str], rounds: int = 3) -> None:
    """Each set-up in its own uvicorn, all started at once; runs interleaved, medians kept."""
    loads = [(tool, connections) for tool, connections in LOAD_RUNS if tool in tools]
    setups = {name: {"BENCH_SETUP": name} for name in SETUPS}
    results = medians(interleaved(setups, loads, tools, rounds, LOAD_SECONDS))
    print(
        f"\n{rounds} interleaved rounds of {LOAD_SECONDS} s per run and set-up "
        "(medians); each set-up in its own uvicorn process, spans sent to an OTLP/HTTP receiver "
        "in another\n"
    )
    print("| tool | set-up | connections | requests/s | p50 ms | p99 ms | p99 / tracing off |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tool, connections in loads:
        base = results[(tool, connections, "perfmw")]["p99"]
        for setup, name in SETUPS.items():
            found = results[(tool, connections, setup)]
            print(
                f"| {tool} | {name} | {connections} | {found['rps']:.0f} | "
                f"{found['p50']:.3f} | {found['p99']:.3f} | {found['p99'] / base:.2f}x |"
            )
    for tool, connections in BUDGET_RUNS:
        if tool not in tools:
            print(f"{tool} not found: no budget line for concurrency {connections}")
            continue
        off = results[(tool, connections, "perfmw")]["p99"]
        ratio = results[(tool, connections, "perfmw-traced")]["p99"] / off
        print(
            f"configure_tracing() p99 at concurrency {connections} ({tool}): {ratio:.2f}x "
            "tracing off (budget 2.00)"
        )


def main() -> None:
    in_process()
    tools = {name: path for name in LOADERS if (path := find_tool(name))}
    if not tools:
        print("\nneither wrk nor hey found (Debian: apt-get install wrk hey): load runs skipped")
        return
    under_load(tools)


if __name__ == "__main__":
    main()
