"""Load runs against uvicorn in its own process: the servers, the load tools, their output.

wrk and hey are found on PATH or installed with apt-get (Debian packages `wrk`, `hey`) as root.
With two CPUs or more, the servers run on the first and the load tools and the OTLP receiver on
the others (CPUS): each server has a core to itself, as a service has in production with its
clients and its collector on other machines, and a neighbour's load moves its rate less.
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

ROOT = Path(__file__).resolve().parent.parent


def _cpu_split() -> tuple[set[int], set[int]] | None:
    """The CPUs of the servers and those of the load tools and the receiver (see the module's
    docstring); None with one CPU, or where affinity cannot be set: all share."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else None


CPUS = _cpu_split()


def _pinned(which: int) -> Any:
    """A preexec_fn that pins the child to CPUS[which] (0: servers, 1: load and receiver)."""
    if CPUS is None:
        return None
    cpus = CPUS[which]
    return lambda: os.sched_setaffinity(0, cpus)


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
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
        preexec_fn=_pinned(1),
    )
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


def start_server(
    setup: str,
    receiver_port: int,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[Any], str]:
    """uvicorn (one worker) serving benchmarks/_server.py set up as `setup`, run under `prefix`
    (valgrind's command line, say); its item URL."""
    port = free_port()
    environment = {
        **os.environ,
        "BENCH_SETUP": setup,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    command = [*prefix, sys.executable, "-m", "uvicorn", "benchmarks._server:app"]
    options = ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(
        [*command, *options], cwd=ROOT, env=environment, preexec_fn=_pinned(0)
    )
    return server, f"http://127.0.0.1:{port}/items/42"


def start_receiver() -> tuple[subprocess.Popen[Any], int]:
    """An OTLP/HTTP receiver in its own process that counts what it is sent; its port."""
    port = free_port()
    script = str(ROOT / "tests" / "otlp_receiver.py")
    receiver = subprocess.Popen(
        [sys.executable, script, str(port), "--count-only"],
        stdout=subprocess.DEVNULL,
        preexec_fn=_pinned(1),
    )
    wait_listening(port, receiver)
    return receiver, port


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


LOADERS = {"wrk": wrk_latency, "hey": hey_latency}
Runs = dict[tuple[str, int, str], list[dict[str, float]]]


def interleaved(
    setups: dict[str, dict[str, str]],
    loads: list[tuple[str, int]],
    tools: dict[str, str],
    rounds: int,
    seconds: int,
) -> Runs:
    """Each set-up (its BENCH_SETUP and extra environment, by name) in its own uvicorn,
    all started at once, spans sent to one receiver; every (tool, connections) load run on each
    in turn, `rounds` times. Each run's requests/s, p50 and p99 (ms), in round order, by (tool,
    connections, set-up name)."""
    receiver, receiver_port = start_receiver()
    servers: dict[str, tuple[subprocess.Popen[Any], str]] = {}
    runs: Runs = {}
    warm_up = loads[0][0]
    try:
        for name, env in setups.items():
            servers[name] = start_server(env["BENCH_SETUP"], receiver_port, env)
        for server, url in servers.values():
            wait_listening(port_of(url), server)
            LOADERS[warm_up](tools[warm_up], url, 1, 1)
        for _ in range(rounds):
            for tool, connections in loads:
                for name, (_, url) in servers.items():
                    found = LOADERS[tool](tools[tool], url, connections, seconds)
                    runs.setdefault((tool, connections, name), []).append(found)
    finally:
        for server, _ in servers.values():
            stop(server)
        stop(receiver)
    return runs


def medians(runs: Runs) -> dict[tuple[str, int, str], dict[str, float]]:
    """The median requests/s, p50 and p99 of each set-up's runs."""
    return {
        key: {k: statistics.median(run[k] for run in found) for k in ("rps", "p50", "p99")}
        for key, found in runs.items()
    }


def paired(runs: list[dict[str, float]], base: list[dict[str, float]], key: str) -> float:
    """The median over rounds of `key` against the baseline's in the same round: a shared
    machine's drift from one round to the next cancels."""
    return statistics.median(a[key] / b[key] for a, b in zip(runs, base, strict=True))
