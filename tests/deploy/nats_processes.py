"""Start and stop nats-server processes on free loopback ports for the deployment tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def nats_server_binary() -> str | None:
    """Return the nats-server path: the one beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_config(
    binary: str, config: Path, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the server's own configuration test (``nats-server -t -c FILE``)."""
    return subprocess.run(
        [binary, "-t", "-c", str(config)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


_PROBE = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)"


class NatsProcess:
    """One nats-server child process, its log file and its monitoring port."""

    def __init__(
        self,
        binary: str,
        config: Path,
        env: Mapping[str, str],
        monitor_port: int,
        namespace: str | None = None,
    ) -> None:
        self.config = config
        self.monitor_port = monitor_port
        self.namespace = namespace
        self.log_path = config.with_suffix(".log")
        self._log = self.log_path.open("w")
        # `ip netns exec` replaces itself with the server, so the pid is the server's.
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        self.process = subprocess.Popen(
            [*prefix, binary, "-c", str(config)],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, timeout_s: float, path: str = "/healthz") -> None:
        """Poll the monitoring endpoint until it returns 200; raise with the log if it does not."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server {self.config.name} exited:\n{self.log()}")
            if self.namespace is not None:
                # The endpoint is only reachable from inside the server's network namespace.
                probe = subprocess.run(
                    ["ip", "netns", "exec", self.namespace, sys.executable, "-c", _PROBE, url],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                if probe.returncode == 0:
                    return
                last_error = probe.stderr.strip()[-200:]
            else:
                try:
                    with urllib.request.urlopen(url, timeout=1) as response:
                        if response.status == 200:
                            return
                except urllib.error.HTTPError as exc:
                    last_error = f"HTTP {exc.code}: {exc.read()[:200]!r}"
                except OSError as exc:
                    last_error = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(f"{url} not healthy after {timeout_s}s ({last_error}):\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
