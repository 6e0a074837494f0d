"""The perfmw command line: `perfmw report` and `perfmw run`.

    perfmw run uvicorn myapp:app [ARGS...]     # the program with perfmw in it (launcher.py)
    perfmw report --url http://127.0.0.1:8000 [--token T] [--out FILE] [--format md|json]
    perfmw report --prometheus http://prometheus:9090 --job api [--since 1h]
    perfmw report --compare before.json after.json
    perfmw --version
    python -m perfmw report ...

A failure is one line on stderr, never a traceback: exit status 2 for a usage error (arguments
that do not go together or are out of range), 1 for one at run time (an unreachable service, a
refused token, an answer or file that is not what perfmw writes, an unwritable --out).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

from . import report
from ._report_escape import visible
from .settings import env_name


def _version() -> str:
    import perfmw

    return str(perfmw.__version__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfmw", description="perfmw command line")
    parser.add_argument("--version", action="version", version=f"perfmw {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run",
        help="run a server with perfmw in it: perfmw run uvicorn myapp:app",
        add_help=False,
    )
    sub = commands.add_parser(
        "report",
        help="write the performance report of a running service",
        description="Read a running service's metrics and findings endpoints and write the "
        "performance report; or compare two reports written with --format json.",
    )
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="base URL of the service, e.g. http://127.0.0.1:8000")
    source.add_argument(
        "--prometheus",
        metavar="URL",
        help="base URL of a Prometheus (or Thanos, Mimir) that scrapes the service: the report "
        "of every replica it scrapes, from its query API",
    )
    source.add_argument(
        "--compare",
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="two reports written with --format json: print the before/after table",
    )
    sub.add_argument(
        "--token",
        default=os.environ.get(env_name("access_token")) or None,
        help=f"the service's access_token (default: ${env_name('access_token')})",
    )
    sub.add_argument("--out", help="write to this file instead of stdout")
    sub.add_argument("--format", choices=("md", "json"), default="md", help="default: md")
    sub.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="scrape twice, this many seconds apart, and report only what happened between "
        "(request rates and percentiles of the present load); default: totals since start",
    )
    sub.add_argument("--metrics-path", default="/metrics", help="default: /metrics")
    sub.add_argument(
        "--findings-path", default="/perfmw/findings", help="default: /perfmw/findings"
    )
    sub.add_argument(
        "--probes",
        type=int,
        default=1,
        metavar="N",
        help="ask the findings endpoint N times and merge what each worker answered (each "
        "worker process keeps its own findings); default: 1",
    )
    sub.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    pick = sub.add_mutually_exclusive_group()
    pick.add_argument("--job", help="with --prometheus: the service's scrape job")
    pick.add_argument(
        "--selector",
        help="with --prometheus: label matchers that pick the service, e.g. "
        '\'{job="api",namespace="prod"}\'',
    )
    sub.add_argument(
        "--since",
        default="1h",
        metavar="DURATION",
        help="with --prometheus: the window to report on (30m, 1h, 7d...); default: 1h",
    )
    return parser


def _check(args: argparse.Namespace) -> None:
    """UsageError for arguments argparse lets through that cannot work."""
    if (args.job or args.selector) and not args.prometheus:
        raise report.UsageError("--job and --selector go with --prometheus")
    if not 0 <= args.interval < math.inf:
        raise report.UsageError(f"--interval must be >= 0, got {args.interval}")
    if not 1 <= args.probes <= 100:
        raise report.UsageError(f"--probes must be between 1 and 100, got {args.probes}")
    if not 0 < args.timeout < math.inf:
        raise report.UsageError(f"--timeout must be > 0, got {args.timeout}")


def run_report(args: argparse.Namespace) -> str:
    """The text `perfmw report` writes for parsed arguments; ReportError on failure (a
    UsageError for bad arguments)."""
    _check(args)
    if args.compare:
        before, after = (report.load_report(path) for path in args.compare)
        return report.render_compare(before, after)
    if args.prometheus:
        from ._report_prometheus import collect_prometheus

        snapshot, window = collect_prometheus(
            args.prometheus,
            job=args.job,
            selector=args.selector,
            since=args.since,
            timeout=args.timeout,
        )
        measured = f"over the last {args.since}, every replica Prometheus scrapes"
        document = report.analyse(snapshot, window=window, measured=measured)
        return (
            report.render_json(document)
            if args.format == "json"
            else report.render_markdown(document)
        )

    def scrape() -> report.Snapshot:
        return report.collect(
            args.url,
            token=args.token,
            metrics_path=args.metrics_path,
            findings_path=args.findings_path,
            timeout=args.timeout,
            probes=args.probes,
        )

    first = scrape()
    baseline = None
    if args.interval > 0:
        time.sleep(args.interval)
        baseline, first = first, scrape()
    document = report.analyse(first, baseline)
    if args.format == "json":
        return report.render_json(document)
    return report.render_markdown(document)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:
        # Everything after `run` is the program's own command line, options included: not
        # for argparse to read.
        from . import launcher

        return launcher.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        text = run_report(args)
        if args.out:
            try:
                with open(args.out, "w", encoding="utf-8") as handle:
                    handle.write(text)
            except OSError as exc:
                raise report.ReportError(
                    f"cannot write {args.out}: {exc.strerror or exc}"
                ) from None
        else:
            sys.stdout.write(text)
    except report.ReportError as exc:
        # One line whatever the answer held that the message quotes (a line break, say).
        print(f"perfmw report: {visible(str(exc))}", file=sys.stderr)
        return 2 if isinstance(exc, report.UsageError) else 1
    except KeyboardInterrupt:
        print("perfmw report: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
