"""Per-request cost of perfmw's middleware against bare FastAPI and the peers users replace.

In-process (the ASGI app called directly, no network), interleaved rounds, medians. Budget
(foundation issue): perfmw adds at most 6 µs per request and at most a fifth of what
prometheus-fastapi-instrumentator adds.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

import perfmw
from benchmarks._asgi import items_app, per_request_us, table


def variants() -> dict[str, Any]:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from prometheus_fastapi_instrumentator import Instrumentator
    from starlette_exporter import PrometheusMiddleware

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    bare = items_app()

    with_perfmw = items_app()
    perfmw.instrument(
        with_perfmw, settings=perfmw.Settings(trace=False), registry=CollectorRegistry()
    )

    # What the one-line set-up costs: trace=True by default, no TracerProvider configured.
    defaults = items_app()
    perfmw.instrument(defaults, registry=CollectorRegistry())

    instrumentator = items_app()
    Instrumentator(registry=CollectorRegistry()).instrument(instrumentator)

    exporter = items_app()
    exporter.add_middleware(PrometheusMiddleware)

    otel = items_app()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Dropping()))
    FastAPIInstrumentor.instrument_app(otel, tracer_provider=provider)

    return {
        "bare FastAPI": bare,
        "perfmw": with_perfmw,
        "perfmw, default settings (no TracerProvider)": defaults,
        "prometheus-fastapi-instrumentator": instrumentator,
        "starlette-exporter": exporter,
        "OpenTelemetry FastAPI (SDK, dropping exporter)": otel,
    }


def main() -> None:
    medians = per_request_us(variants())
    print(table(medians, "bare FastAPI"))
    base = medians["bare FastAPI"]
    ours = medians["perfmw"] - base
    instrumentator = medians["prometheus-fastapi-instrumentator"] - base
    print(
        f"\nperfmw adds {ours:.1f} µs/request (budget 6.0); "
        f"{ours / instrumentator:.2f} of prometheus-fastapi-instrumentator's "
        f"{instrumentator:.1f} µs (budget 0.20)"
    )


if __name__ == "__main__":
    main()
