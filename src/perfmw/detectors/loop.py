"""Loop stalls and blocking calls recorded on a request become findings, one per location.

A stall the machine caused (`starved`, `throttled`) is counted in the metrics and never becomes
a finding: there is no line of code to change. A stall with no application frame on the stack
(a framework serializing the response, say) is located at the route's handler.
"""

from __future__ import annotations

from ..findings import Finding
from ..record import MACHINE_CAUSES, RequestRecord
from ..settings import Settings
from .http import endpoint_location


def detect(record: RequestRecord, settings: Settings) -> list[Finding]:
    found: dict[tuple[str, str | None], Finding] = {}
    for stall in record.stalls:
        if stall.cause in MACHINE_CAUSES:
            continue
        location = stall.location or endpoint_location(record.endpoint)
        if location is None and stall.via is None:
            continue  # nothing to act on: counted in the metrics only
        key = ("loop_stall", location)
        finding = found.get(key)
        if finding is None:
            detail = {
                "cause": stall.cause,
                "duration_seconds": stall.duration_seconds,
                "stack": list(stall.stack),
                "gc_seconds": stall.gc_seconds,
                # The other requests' wait for the loop: what a fix gives back.
                "requests_waiting": stall.requests_waiting,
                "delayed_seconds": stall.delayed_seconds,
            }
            if stall.signals is not None:
                detail.update(stall.signals.evidence())
            found[key] = Finding(
                "loop_stall", record.route, location, stall.duration_seconds, detail, via=stall.via
            )
        else:
            finding.count += 1
            finding.total_seconds += stall.duration_seconds
            finding.detail["delayed_seconds"] += stall.delayed_seconds
            finding.detail["requests_waiting"] = stall.requests_waiting  # the latest's
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
                via=call.via,
            )
        else:
            finding.count += 1
            finding.total_seconds += call.duration_seconds
            if "delayed_seconds" in call.detail:
                detail = finding.detail
                detail["delayed_seconds"] = (
                    detail.get("delayed_seconds", 0.0) + call.detail["delayed_seconds"]
                )
                detail["requests_waiting"] = call.detail["requests_waiting"]  # the latest's
    return list(found.values())
