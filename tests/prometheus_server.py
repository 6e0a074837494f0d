"""Test support: promtool and a real Prometheus server on 127.0.0.1.

Both come from the Debian package `prometheus`. `make test` installs it; run directly as root,
the tests install it themselves. Only where installing is impossible (not root, no apt-get, no
network) do the tests that need it skip, with a reason that says so in capitals.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import wait_for

_install_failure: str | None = None


def _install() -> str | None:
    """Install the Debian package once per session; the reason it could not, or None."""
    global _install_failure
    if _install_failure is not None:
        return _install_failure
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _install_failure = "not root with apt-get"
        return _install_failure
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            _install_failure = f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
            return _install_failure
    return None


def tool(name: str) -> str:
    """Path of `promtool` or `prometheus`, installing the package if needed and possible."""
    path = shutil.which(name)
    if path is None:
        failure = _install()
        path = shutil.which(name)
        if path is None:
            pytest.skip(
                f"PROMETHEUS NOT INSTALLED: {name} is missing and could not be installed "
                f"({failure or 'the package did not provide it'}). Install the Debian package "
                "'prometheus' (make test does, as root) to run this test."
            )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """`prometheus` with the given configuration, on a free port, storing under `directory`."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = directory / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config_file}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={directory / 'data'}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=self.url, timeout=5)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.logs()}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus was not ready in {timeout} s: {self.logs()}")

    def api(self, path: str, **params: str) -> Any:
        answer = self.client.get(f"/api/v1/{path}", params=params)
        document = answer.json()
        assert document["status"] == "success", document
        return document["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one result) of `expr` now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, or None when the result is empty."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, check: Any, timeout: float = 20) -> Any:
        """Poll `check()` until it returns something truthy; fail naming `what`."""
        try:
            return wait_for(check, timeout, what, interval=0.25)
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{self.logs()}") from None

    def logs(self) -> str:
        self.log.flush()
        return (self.directory / "prometheus.log").read_text()[-3000:]

    def stop(self) -> None:
        self.client.close()
        stop_process(self.process)
        self.log.close()


def stop_process(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM the process's group, SIGKILL it if it lingers; the process is reaped."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(process.pid, signal.SIGKILL)
