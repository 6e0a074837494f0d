"""The Prometheus sink: queued request observations are bounded and never lost."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest

from perfmw.exporters import prometheus
from perfmw.exporters.prometheus import sink_for
from perfmw.record import RequestRecord
from support import request_count, sample


def finished(route: str, duration: float = 0.002) -> RequestRecord:
    record = RequestRecord(route, "GET", "/x", "http", None)
    record.status_code = 200
    record.duration_seconds = duration
    record.response_bytes = 10
    return record


def requests_counted(registry: CollectorRegistry, route: str) -> float | None:
    return request_count(generate_latest(registry).decode(), route)


def test_the_queue_of_observations_stays_bounded_and_a_scrape_sees_them_all(
    registry: CollectorRegistry,
) -> None:
    sink = sink_for(registry)
    for _ in range(10 * prometheus._BATCH + 7):
        sink.observe_request(finished("/a"))
        assert len(sink._pending) < prometheus._BATCH
    assert requests_counted(registry, "/a") == 10 * prometheus._BATCH + 7
    assert len(sink._pending) == 0


def test_observations_from_many_threads_during_scrapes_are_exact(
    registry: CollectorRegistry,
) -> None:
    sink = sink_for(registry)
    done = threading.Event()

    def scrape_until_done() -> None:
        while not done.is_set():
            generate_latest(registry)

    def observe() -> None:
        for _ in range(5_000):
            sink.observe_request(finished("/b", 0.03))

    scraper = threading.Thread(target=scrape_until_done)
    scraper.start()
    workers = [threading.Thread(target=observe) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    scraper.join()
    text = generate_latest(registry).decode()
    assert requests_counted(registry, "/b") == 40_000
    assert (
        sample(
            text,
            "http_server_request_duration_seconds_bucket",
            http_request_method="GET",
            http_route="/b",
            http_response_status_code="200",
            le="0.025",
        )
        == 0
    )
    assert (
        sample(
            text,
            "http_server_request_duration_seconds_bucket",
            http_request_method="GET",
            http_route="/b",
            http_response_status_code="200",
            le="0.05",
        )
        == 40_000
    )
