"""Faults of the machine around a real server: what each costs, and that it never costs the app.

docs/production.md's fault table points at these tests (and at the ones of the other rows).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import perfmw
from otlp_receiver import OtlpReceiver
from perfmw import _guard
from perfmw.exporters import multiprocess_files
from perfmw.exporters.multiprocess_files import ReservedFile
from perfmw.exporters.otlp import RETRY_ATTEMPTS, LoopFriendlySpanProcessor, OtlpHttpSender
from support import hammer, sample, samples, serve, serve_script, wait_for

#: The app defines one new series per request, as an app with an unbounded label does, so
#: that its file must keep growing after the disk is full. Its first metric opens its file before
#: perfmw is there, as an app that defines metrics at import does.
GROWING_APP = """
import sys

import uvicorn
from fastapi import FastAPI
from prometheus_client import Counter

served = Counter("app_served", "Requests served.")
served.inc(0)
items = Counter("app_items", "Items served.", ["item"])
app = FastAPI()


@app.get("/items/{n}")
async def item(n: int) -> dict[str, int]:
    served.inc()
    items.labels(item=f"{n:01000d}").inc()
    return {"n": n}


import perfmw

perfmw.instrument(app)
uvicorn.run(app, fd=int(sys.argv[1]), log_level="warning")
"""


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` mounted at `path` (this needs root, as CI has)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path) -> None:
    """Write a file until the filesystem has no byte left."""
    with open(directory / "filler", "wb", buffering=0) as filler, pytest.raises(OSError) as full:
        while True:
            filler.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC


def items_counted(exposition: str) -> int:
    return sum(1 for name, _ in samples(exposition) if name == "app_items_total")


def test_a_full_disk_costs_new_series_never_the_app(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "multiproc", "1m") as directory,
        serve_script(
            GROWING_APP, tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}
        ) as url,
    ):
        assert httpx.get(f"{url}/items/0", timeout=10).status_code == 200
        fill(directory)

        statuses = hammer(int(url.rsplit(":", 1)[1]), [f"/items/{n}" for n in range(1, 200)])
        assert statuses == [200] * 199

        scraped = httpx.get(f"{url}/metrics", timeout=10)
        assert scraped.status_code == 200
        exposition = scraped.text
        # The series that had their space before the disk filled go on counting...
        assert (
            sample(
                exposition,
                "http_server_request_duration_seconds_count",
                http_route="/items/{n}",
                http_request_method="GET",
                http_response_status_code="200",
            )
            == 200
        )
        assert sample(exposition, "app_served_total") == 200
        # ...the new ones that found no space are lost, each counted as an internal error.
        lost = 200 - items_counted(exposition)
        assert lost > 0
        errors = sample(exposition, "perfmw_internal_errors_total", component="multiprocess")
        assert errors is not None and errors >= lost
    # Each fault is one sentence, logged once: no traceback, no "Fatal Python error" (a busy
    # machine may add a line of its own, such as a stall of the server's start).
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "Fatal Python error" not in log
    faults = [line for line in log.splitlines() if "No space left on device" in line]
    assert len(set(faults)) == len(faults)
    assert all(line.startswith("perfmw: ") for line in faults), faults
    counter_file = f"perfmw: no space for a new series in {directory}/counter_"
    assert any(line.startswith(counter_file) for line in faults)


def test_a_removed_directory_is_a_500_of_the_scrape_only(tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    with serve_script(
        GROWING_APP, tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    ) as url:
        shutil.rmtree(directory)

        statuses = hammer(int(url.rsplit(":", 1)[1]), [f"/items/{n}" for n in range(200)])
        assert statuses == [200] * 200
        scrapes = [httpx.get(f"{url}/metrics", timeout=10) for _ in range(2)]
        assert [s.status_code for s in scrapes] == [500, 500]
        assert scrapes[0].text == (
            f"perfmw: PROMETHEUS_MULTIPROC_DIR={str(directory)!r} is gone: the workers' "
            "metrics cannot be read (recreate it and restart the workers)\n"
        )
        assert httpx.get(f"{url}/items/0", timeout=10).status_code == 200
    log = (tmp_path / "server.log").read_text()
    assert log.count(f"PROMETHEUS_MULTIPROC_DIR={str(directory)!r} is gone") == 2
    assert "Traceback" not in log


def stored(path: Path) -> dict[str, float]:
    """What a scrape reads of a file."""
    return {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))}


@pytest.mark.faults
def test_a_series_with_no_space_is_lost_and_counted_the_others_go_on(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        file = ReservedFile(str(disk / "counter_1.db"))
        file.write_value("old", 1.0, 0.0)
        fill(disk)
        errors = _guard.error_counts["multiprocess"]

        file.write_value("old", 2.0, 0.0)
        for n in range(100):  # 100 series of 1 KiB: more than the file's first 64 KiB
            file.write_value(f"new-{n:01000d}", float(n), 0.0)
        file.write_value("new-" + "0" * 1000, 7.0, 0.0)  # a lost series again: not recounted

        on_disk = stored(disk / "counter_1.db")
        assert on_disk["old"] == 2.0
        kept = [key for key in on_disk if key.startswith("new-")]
        assert len(kept) < 100
        assert _guard.error_counts["multiprocess"] - errors == 100 - len(kept)
        assert file.read_value(f"new-{99:01000d}") == (0.0, 0.0)
        file.close()


@pytest.mark.faults
def test_past_max_lost_a_lost_series_is_tried_and_counted_at_each_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiprocess_files, "MAX_LOST", 2)
    with tmpfs(tmp_path / "disk", "64k") as disk:
        file = ReservedFile(str(disk / "counter_1.db"))
        fill(disk)
        errors = _guard.error_counts["multiprocess"]
        for _ in range(3):
            for n in range(4):
                file.write_value(f"series-{n}-" + "x" * 70_000, 1.0, 0.0)
        assert len(file._lost) == 2
        # Remembered: counted once each; the others: at each of the three rounds.
        assert _guard.error_counts["multiprocess"] - errors == 2 + 2 * 3
        file.close()


@pytest.mark.faults
def test_a_file_that_cannot_be_opened_keeps_its_series_in_the_process(tmp_path: Path) -> None:
    errors = _guard.error_counts["multiprocess"]
    file = ReservedFile(str(tmp_path / "gone" / "counter_1.db"))
    file.write_value("a", 1.0, 0.0)
    assert file.read_value("a") == (0.0, 0.0)
    assert _guard.error_counts["multiprocess"] - errors == 1  # the open
    assert not (tmp_path / "gone").exists()
    file.close()


@pytest.mark.faults
def test_a_file_left_empty_by_a_failed_open_is_removed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "64k") as disk:
        fill(disk)
        file = ReservedFile(str(disk / "gauge_livesum_1.db"))
        file.write_value("a", 1.0, 0.0)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        file.close()


def traced_app(registry: CollectorRegistry) -> tuple[Starlette, perfmw.Perf]:
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    provider = perfmw.configure_tracing("faults", set_global=False)
    return app, perfmw.instrument(app, registry=registry, tracer_provider=provider)


def test_a_collector_that_hangs_holds_no_request_and_bounds_its_queue(
    receiver: OtlpReceiver, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    receiver.gate = threading.Event()
    app, perf = traced_app(registry)
    provider = perf.tracer_provider
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/").status_code == 200
        export = threading.Thread(target=provider.force_flush)
        export.start()
        wait_for(lambda: receiver.requests == 1, 10, what="the export to reach the collector")
        # The collector holds that export: requests go on, their spans wait in a bounded queue.
        assert [client.get("/").status_code for _ in range(20)] == [200] * 20
        receiver.gate.set()
        export.join(10)
    assert provider.force_flush() is True
    assert [len(receiver.spans), receiver.requests] == [1 + 8, 2]  # 12 spans dropped
    provider.shutdown()


def test_a_collector_answering_500_costs_the_spans_not_the_requests(
    receiver: OtlpReceiver, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 500
    app, perf = traced_app(registry)
    provider = perf.tracer_provider
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert [client.get("/").status_code for _ in range(5)] == [200] * 5
    assert provider.force_flush() is False
    assert receiver.requests == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "perfmw"]
    assert warnings == [f"OTLP endpoint {receiver.endpoint}/v1/traces answered 500; spans dropped"]
    provider.shutdown()


def test_a_collector_asking_for_a_batch_again_gets_it_after_its_retry_after(
    receiver: OtlpReceiver, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers = [(503, "0"), (429, "0")]
    app, perf = traced_app(registry)
    provider = perf.tracer_provider
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert [client.get("/").status_code for _ in range(3)] == [200] * 3
    assert provider.force_flush() is False  # answered 503: sent again by the export thread
    wait_for(lambda: len(receiver.spans) == 3, 10, what="the batch to be sent again")
    assert receiver.requests == 3  # 503, 429, then accepted: each span received once
    assert [span.name for span in receiver.spans] == ["GET /"] * 3
    assert [r.getMessage() for r in caplog.records if r.name == "perfmw"] == []
    provider.shutdown()


def test_a_batch_refused_six_times_is_dropped_with_one_warning(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 502
    sender = OtlpHttpSender(receiver.endpoint + "/v1/traces")
    processor = LoopFriendlySpanProcessor(sender, retry_first_seconds=0.001)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    with provider.get_tracer("faults").start_as_current_span("job"):
        pass
    assert provider.force_flush() is False
    wait_for(
        lambda: any("attempts" in r.getMessage() for r in caplog.records),
        10,
        what="the batch to be given up",
    )
    assert receiver.requests == RETRY_ATTEMPTS == 6  # backed off 1, 2, 4, 8, 16 ms
    assert [r.getMessage() for r in caplog.records if r.name == "perfmw"] == [
        f"OTLP endpoint {receiver.endpoint}/v1/traces answered 502 to 6 attempts; spans dropped"
    ]
    assert receiver.spans == []
    provider.shutdown()
    assert receiver.requests == 6  # nothing was left to send at shutdown


def test_a_route_with_line_breaks_cannot_forge_a_log_line() -> None:
    from perfmw.exporters.logs import describe
    from perfmw.findings import Finding

    forged = "/r\nperfmw: N+1 queries on /admin"
    finding = Finding(
        "loop_stall",
        forged,
        "app.py:3\nfake.py:1",
        detail={"duration_seconds": 0.2, "cause": "cpu", "stack": ["app.py:3 in f\nx"]},
    )
    assert describe(finding).splitlines() == [
        "event loop stalled 200 ms (cpu) on /r\\nperfmw: N+1 queries on /admin at "
        "app.py:3\\nfake.py:1",
        "    app.py:3 in f\\nx",
    ]


@pytest.mark.parametrize(
    ("variable", "protocol"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
    ],
)
def test_an_otlp_protocol_perfmw_does_not_speak_fails_at_configure_tracing(
    monkeypatch: pytest.MonkeyPatch, variable: str, protocol: str
) -> None:
    monkeypatch.setenv(variable, protocol)
    with pytest.raises(ValueError) as raised:
        perfmw.configure_tracing("faults", set_global=False)
    assert str(raised.value) == (
        f"{variable}={protocol!r}: perfmw.configure_tracing() sends OTLP over HTTP as protobuf "
        "('http/protobuf'); for another protocol, build a TracerProvider with OpenTelemetry's "
        "exporter for it and pass it to perfmw.instrument(app, tracer_provider=...)"
    )


def test_http_protobuf_is_the_protocol_spoken(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "HTTP/Protobuf")
    provider = perfmw.configure_tracing("faults", set_global=False)
    with provider.get_tracer("faults").start_as_current_span("job"):
        pass
    assert provider.force_flush() is True
    assert [(span.name, span.resource["service.name"]) for span in receiver.spans] == [
        ("job", "faults")
    ]
    provider.shutdown()
