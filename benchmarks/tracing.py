"""Tracing's cost: per request in-process, and tail latency under load on a real uvicorn.

In-process (the ASGI app called directly, interleaved rounds, medians). Budgets (issue 6):
perfmw with tracing on (SDK provider, dropping exporter) adds at most half of what
OpenTelemetry's FastAPI instrumentation adds; an unsampled request (parent-based ratio
sampler at 0.1) costs within 3 µs of tracing off.

Under load (wrk and hey, concurrency 1 and 32, against uvicorn in its own process, spans
exported over OTLP/HTTP to a receiver in another process): `configure_tracing()`'s set-up keeps
p99 within 2x of tracing off. OpenTelemetry's default BatchSpanProcessor is shown beside it.
wrk and hey are found on PATH or installed with apt-get (Debian packages `wrk`, `hey`) as root.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import perfmw
from benchmarks._asgi import items_app, per_request_us, table

ROOT = Path(__file__).resolve().parent.parent
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


# Load: wrk and hey against uvicorn in another process.


def find_tool(name: str) -> str | None:
    """`name` on PATH, else installed with apt-get (Debian package of the same name) as root."""
    found = shutil.which(name)
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", name],
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        found = shutil.which(name)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process for port {port} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_latency(wrk: str, url: str, connections: int, seconds: int) -> dict[str, float]:
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    return parse_wrk(run_load(command, seconds))


def hey_latency(hey: str, url: str, connections: int, seconds: int) -> dict[str, float]:
    return parse_hey(run_load([hey, "-c", str(connections), "-z", f"{seconds}s", url], seconds))


def run_load(command: list[str], seconds: int) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return done.stdout


def parse_wrk(output: str) -> dict[str, float]:
    """p50 and p99 in ms, and requests/s, from `wrk --latency`'s output."""
    percentiles = re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    found = {f"p{label}": float(value) * _UNITS[unit] for label, value, unit in percentiles}
    return _complete(found, output, "wrk")


def parse_hey(output: str) -> dict[str, float]:
    """p50 and p99 in ms (hey prints 0.1 ms), and requests/s, from hey's summary."""
    percentiles = re.findall(r"^\s+(50|99)% in ([\d.]+) secs", output, re.M)
    found = {f"p{label}": float(value) * 1e3 for label, value in percentiles}
    return _complete(found, output, "hey")


def _complete(found: dict[str, float], output: str, tool: str) -> dict[str, float]:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None or set(found) != {"p50", "p99"}:
        raise ValueError(f"no requests/s, p50 and p99 in {tool}'s output:\n{output}")
    return found | {"rps": float(rate.group(1))}


def start_server(mode: str, receiver_port: int) -> tuple[subprocess.Popen[Any], str]:
    port = free_port()
    env = {
        **os.environ,
        "PERFMW_BENCH_TRACING": mode,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "uvicorn", "benchmarks._tracing_server:app"]
    options = ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen([*command, *options], cwd=ROOT, env=env)
    return server, f"http://127.0.0.1:{port}/items/42"


MODES = {
    "off": "perfmw, tracing off",
    "perfmw": "perfmw + configure_tracing()",
    "otel-batch": "perfmw + OTel BatchSpanProcessor",
}
LOADERS = {"wrk": wrk_latency, "hey": hey_latency}
#: (tool, connections) of each load run; the budget is read from the first two. wrk measures
#: to the microsecond with a light client, what concurrency 1 needs. At 32 connections wrk's
#: p99 is mostly its coordinated-omission correction applied to the start of the run, when
#: uvicorn (uvloop) takes the 32 new connections in one per loop iteration; hey reports each
#: request's own latency, which a packet capture matched to 0.1 ms (docs/tracing.md).
LOAD_RUNS = (("wrk", 1), ("hey", 32), ("wrk", 32))
BUDGET_RUNS = LOAD_RUNS[:2]


def under_load(tools: dict[str, str], rounds: int = 3) -> None:
    """Each set-up in its own uvicorn, all started at once; runs interleaved, medians kept."""
    receiver_port = free_port()
    receiver_script = str(ROOT / "tests" / "otlp_receiver.py")
    receiver = subprocess.Popen(
        [sys.executable, receiver_script, str(receiver_port), "--count-only"],
        stdout=subprocess.DEVNULL,
    )
    servers: dict[str, tuple[subprocess.Popen[Any], str]] = {}
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    loads = [(tool, connections) for tool, connections in LOAD_RUNS if tool in tools]
    warm_up = loads[0][0]
    try:
        wait_listening(receiver_port, receiver)
        for mode in MODES:
            servers[mode] = start_server(mode, receiver_port)
        for server, url in servers.values():
            wait_listening(int(url.split(":")[2].split("/")[0]), server)
            LOADERS[warm_up](tools[warm_up], url, 1, 1)  # warm-up
        for _ in range(rounds):
            for tool, connections in loads:
                for mode, (_, url) in servers.items():
                    found = LOADERS[tool](tools[tool], url, connections, LOAD_SECONDS)
                    runs.setdefault((tool, connections, mode), []).append(found)
    finally:
        for server, _ in servers.values():
            stop(server)
        stop(receiver)

    results = {
        key: {k: statistics.median(run[k] for run in found) for k in ("rps", "p50", "p99")}
        for key, found in runs.items()
    }
    print(
        f"\n{rounds} interleaved rounds of {LOAD_SECONDS} s per run and set-up "
        "(medians); each set-up in its own uvicorn process, spans sent to an OTLP/HTTP receiver "
        "in another\n"
    )
    print("| tool | set-up | connections | requests/s | p50 ms | p99 ms | p99 / tracing off |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tool, connections in loads:
        base = results[(tool, connections, "off")]["p99"]
        for mode, name in MODES.items():
            found = results[(tool, connections, mode)]
            print(
                f"| {tool} | {name} | {connections} | {found['rps']:.0f} | "
                f"{found['p50']:.3f} | {found['p99']:.3f} | {found['p99'] / base:.2f}x |"
            )
    for tool, connections in BUDGET_RUNS:
        if tool not in tools:
            print(f"{tool} not found: no budget line for concurrency {connections}")
            continue
        off = results[(tool, connections, "off")]["p99"]
        ratio = results[(tool, connections, "perfmw")]["p99"] / off
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
