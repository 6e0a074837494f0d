"""Who perfmw's own endpoints answer: without access_token, the findings (stacks and file paths)
go to this machine only, the metrics to anyone (Prometheus scrapes from elsewhere).

The client address is the one the server puts in the ASGI scope; the transport sets it here.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import perfmw
from perfmw.endpoints import LOCAL_ONLY

FINDINGS, DATA, METRICS = "/perfmw/findings", "/perfmw/data.json", "/metrics"


def statuses(
    client: tuple[str, int],
    headers: dict[str, str] | None = None,
    settings: perfmw.Settings | None = None,
) -> dict[str, tuple[int, bytes]]:
    app = FastAPI()
    perf = perfmw.instrument(app, settings or perfmw.Settings(), registry=CollectorRegistry())

    async def ask() -> dict[str, tuple[int, bytes]]:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            answers = {path: await http.get(path, headers=headers) for path in (FINDINGS, DATA)}
            answers[METRICS] = await http.get(METRICS, headers=headers)
        return {path: (r.status_code, r.content) for path, r in answers.items()}

    try:
        return asyncio.run(ask())
    finally:
        perf.shutdown()


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"])
def test_this_machine_gets_the_findings(address: str) -> None:
    answers = statuses((address, 40000))
    assert {path: status for path, (status, _) in answers.items()} == {
        FINDINGS: 200,
        DATA: 200,
        METRICS: 200,
    }


@pytest.mark.parametrize(
    ("address", "headers"),
    [
        ("10.1.2.3", {}),
        ("192.168.0.7", {}),
        ("2001:db8::1", {}),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}),  # a proxy on this machine
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}),
        ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}),
    ],
)
def test_other_machines_get_the_metrics_but_not_the_findings(
    address: str, headers: dict[str, str]
) -> None:
    answers = statuses((address, 40000), headers)
    assert answers[FINDINGS] == (403, LOCAL_ONLY)
    assert answers[DATA] == (403, LOCAL_ONLY)
    assert answers[METRICS][0] == 200


def test_with_a_token_other_machines_get_everything_they_sign_for() -> None:
    settings = perfmw.Settings(access_token="s3cret")
    refused = statuses(("10.1.2.3", 40000), settings=settings)
    assert {path: status for path, (status, _) in refused.items()} == {
        FINDINGS: 401,
        DATA: 401,
        METRICS: 401,
    }
    signed = statuses(("10.1.2.3", 40000), {"Authorization": "Bearer s3cret"}, settings)
    assert {path: status for path, (status, _) in signed.items()} == {
        FINDINGS: 200,
        DATA: 200,
        METRICS: 200,
    }
