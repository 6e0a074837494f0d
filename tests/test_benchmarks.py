"""The load benchmark's readers of wrk's and hey's output (outputs as the tools print them), and its
table of instruction counts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from benchmarks._load import parse_hey, parse_wrk

WRK = """\
Running 1s test @ http://127.0.0.1:18998/items/42
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.92ms    3.66ms 106.59ms   97.50%
    Req/Sec     4.16k   138.04     4.77k    95.00%
  Latency Distribution
     50%    7.60ms
     75%    7.71ms
     90%    7.91ms
     99%   14.77ms
  16961 requests in 4.10s, 2.15MB read
Requests/sec:   4132.43
Transfer/sec:    537.18KB
"""

HEY = """\

Summary:
  Total:	1.0005 secs
  Slowest:	0.0028 secs
  Fastest:	0.0002 secs
  Average:	0.0003 secs
  Requests/sec:	5950.0957

Latency distribution:
  10% in 0.0003 secs
  50% in 0.0079 secs
  95% in 0.0005 secs
  99% in 0.0159 secs

Details (average, fastest, slowest):
  resp wait:	0.0003 secs, 0.0002 secs, 0.0028 secs

Status code distribution:
  [200]	5953 responses
"""


def test_wrk_percentiles_in_ms_whatever_the_unit() -> None:
    assert parse_wrk(WRK) == {"p50": 7.6, "p99": 14.77, "rps": 4132.43}
    in_us = WRK.replace("50%    7.60ms", "50%  321.00us").replace("99%   14.77ms", "99%   1.20s")
    assert parse_wrk(in_us) == {"p50": 0.321, "p99": 1200.0, "rps": 4132.43}


def test_hey_percentiles_in_ms() -> None:
    assert parse_hey(HEY) == {"p50": 7.9, "p99": 15.9, "rps": 5950.0957}


@pytest.mark.parametrize(
    ("parse", "output"),
    [
        (parse_wrk, WRK.replace("     99%   14.77ms\n", "")),
        (parse_hey, HEY.replace("  Requests/sec:\t5950.0957\n", "")),
        (parse_hey, ""),
    ],
)
def test_output_without_the_numbers_is_an_error_naming_the_tool(
    parse: Callable[[str], dict[str, float]], output: str
) -> None:
    tool = "wrk" if parse is parse_wrk else "hey"
    with pytest.raises(ValueError, match=f"no requests/s, p50 and p99 in {tool}'s output"):
        parse(output)


def test_instruction_counts_are_reported_against_bare_fastapi() -> None:
    from benchmarks.end_to_end import BARE, OURS, TRACED, instructions_report

    counts = {BARE: 929_353, OURS: 964_277, TRACED: 1_316_961}
    assert instructions_report(counts).splitlines() == [
        "| set-up (instructions) | per request | added to bare | requests/s it allows vs bare |",
        "|---|---:|---:|---:|",
        "| bare FastAPI | 929,353 | +0 | 1.00x |",
        "| perfmw (tracing off) | 964,277 | +34,924 | 0.96x |",
        "| perfmw + configure_tracing(), ratio 1.0 | 1,316,961 | +387,608 | 0.71x |",
    ]
