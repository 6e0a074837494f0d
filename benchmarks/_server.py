"""The app the load benchmarks run under uvicorn, set up as BENCH_SETUP says.

    BENCH_SETUP=perfmw uvicorn benchmarks._server:app

bare            FastAPI alone
perfmw          perfmw with settings.trace off: metrics, MongoDB listeners, loop monitor
perfmw-traced   perfmw with perfmw.configure_tracing() (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT)
otel-batch      perfmw with OpenTelemetry's default set-up: BatchSpanProcessor + OTLPSpanExporter
instrumentator  prometheus-fastapi-instrumentator, its /metrics exposed
otel            OpenTelemetry's FastAPI instrumentation, BatchSpanProcessor + OTLPSpanExporter

BENCH_STALL_THRESHOLD (seconds) sets perfmw's stall threshold: under valgrind, where
everything runs about 50 times slower, the loop would otherwise be seen stalled all along.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import perfmw

SETUPS = ("bare", "perfmw", "perfmw-traced", "otel-batch", "instrumentator", "otel")
setup = os.environ.get("BENCH_SETUP", "perfmw")
app = FastAPI()
threshold = float(os.environ.get("BENCH_STALL_THRESHOLD", "0.1"))


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    return {"id": item_id}


def otel_batch_provider() -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


if setup == "perfmw":
    settings = perfmw.Settings(trace=False, stall_threshold_seconds=threshold)
    perfmw.instrument(app, settings=settings, registry=CollectorRegistry())
elif setup == "perfmw-traced":
    provider = perfmw.configure_tracing("bench", set_global=False)
    settings = perfmw.Settings(stall_threshold_seconds=threshold)
    perfmw.instrument(
        app, settings=settings, registry=CollectorRegistry(), tracer_provider=provider
    )
elif setup == "otel-batch":
    perfmw.instrument(app, registry=CollectorRegistry(), tracer_provider=otel_batch_provider())
elif setup == "instrumentator":
    from prometheus_fastapi_instrumentator import Instrumentator

    Instrumentator(registry=CollectorRegistry()).instrument(app).expose(app)
elif setup == "otel":
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=otel_batch_provider())
elif setup != "bare":
    raise ValueError(f"BENCH_SETUP must be one of {', '.join(SETUPS)}, got {setup!r}")
