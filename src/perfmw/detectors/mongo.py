"""MongoDB detectors: N+1, consecutive queries, slow queries, unbounded reads."""

from __future__ import annotations

from ..findings import Finding
from ..record import RequestRecord
from ..settings import Settings


def detect(record: RequestRecord, settings: Settings) -> list[Finding]:
    return []
