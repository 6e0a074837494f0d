"""Loop stalls and blocking calls recorded on a request become findings, one per location."""

from __future__ import annotations

from ..findings import Finding
from ..record import RequestRecord
from ..settings import Settings


def detect(record: RequestRecord, settings: Settings) -> list[Finding]:
    found: dict[tuple[str, str | None], Finding] = {}
    for stall in record.stalls:
        key = ("loop_stall", stall.location)
        finding = found.get(key)
        if finding is None:
            found[key] = Finding(
                "loop_stall",
                record.route,
                stall.location,
                stall.duration_seconds,
                {
                    "cause": stall.cause,
                    "duration_seconds": stall.duration_seconds,
                    "stack": list(stall.stack),
                    "gc_seconds": stall.gc_seconds,
                },
            )
        else:
            finding.count += 1
            finding.total_seconds += stall.duration_seconds
    for call in record.blocking_calls:
        key = ("blocking_call", call.location)
        finding = found.get(key)
        if finding is None:
            found[key] = Finding(
                "blocking_call",
                record.route,
                call.location,
                call.duration_seconds,
                {"kind": call.kind, **call.detail},
            )
        else:
            finding.count += 1
            finding.total_seconds += call.duration_seconds
    return list(found.values())
