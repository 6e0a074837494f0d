"""The app `benchmarks/tracing.py` load-tests under uvicorn, traced as PERFMW_BENCH_TRACING says.

    PERFMW_BENCH_TRACING=off|perfmw|otel-batch uvicorn benchmarks._tracing_server:app

off         perfmw with settings.trace off
perfmw      perfmw with perfmw.configure_tracing() (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT)
otel-batch  perfmw with OpenTelemetry's default set-up: BatchSpanProcessor + OTLPSpanExporter
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import perfmw

mode = os.environ.get("PERFMW_BENCH_TRACING", "off")
app = FastAPI()


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    return {"id": item_id}


if mode == "off":
    perfmw.instrument(app, settings=perfmw.Settings(trace=False), registry=CollectorRegistry())
elif mode == "perfmw":
    provider = perfmw.configure_tracing("bench", set_global=False)
    perfmw.instrument(app, registry=CollectorRegistry(), tracer_provider=provider)
elif mode == "otel-batch":
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    perfmw.instrument(app, registry=CollectorRegistry(), tracer_provider=provider)
else:
    raise ValueError(f"PERFMW_BENCH_TRACING must be off, perfmw or otel-batch, got {mode!r}")
