"""Run a real ``fmserve serve`` subprocess on 127.0.0.1 — for tests and benchmarks.

``start_server(tmp)`` creates a token of the first admin with ``fmserve admin-token`` in a
fresh data dir under ``tmp``, starts ``fmserve serve`` on a free port exactly as a user would,
and returns once ``GET /health`` answers 200 (the bundled models loaded).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fmserve.client import Client, async_http_client, http_client


@dataclass
class LocalServer:
    url: str
    token: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kw: Any) -> httpx.Client:
        """A raw ``httpx.Client`` with this server's URL and token."""
        return http_client(self.url, self.token, timeout=120, **kw)

    def async_client(self, **kw: Any) -> httpx.AsyncClient:
        """A raw ``httpx.AsyncClient`` (see :func:`fmserve.client.async_http_client`)."""
        return async_http_client(self.url, self.token, **kw)

    def api(self, **kw: Any) -> Client:
        """An :class:`fmserve.client.Client` for this server."""
        return Client(self.url, self.token, **kw)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=10).json()  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fmserve_cmd() -> list[str]:
    return [sys.executable, "-m", "fmserve"]


def start_server(tmp: Path, env_extra: dict[str, str] | None = None, timeout_s: float = 180,
                 serve_args: tuple[str, ...] = ()) -> LocalServer:
    """Start ``fmserve serve`` with data dir ``tmp/data``.

    Raises:
        RuntimeError: the server exited or was not healthy within ``timeout_s`` (with its log).
    """
    data_dir = tmp / "data"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABRICKS_TOKEN", "FMSERVE_DATABASE_URL")}
    env.update(FMSERVE_HOME=str(data_dir), **(env_extra or {}))
    out = subprocess.run(fmserve_cmd() + ["admin-token", "--comment", "local server"],
                         env=env, check=True, capture_output=True, text=True).stdout
    token = out.strip().splitlines()[-1]
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(fmserve_cmd() + ["serve", "--port", str(port), *serve_args],
                                env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    srv = LocalServer(f"http://127.0.0.1:{port}", token, data_dir, proc, log_path)
    return wait_until_up(srv, "/health", timeout_s, "fmserve serve")


def wait_until_up(srv: LocalServer, path: str, timeout_s: float, what: str,
                  headers: dict[str, str] | None = None) -> LocalServer:
    """Polls ``GET path`` every 0.25 s until it answers 200; returns ``srv``.

    Raises:
        RuntimeError: ``what`` exited or did not answer within ``timeout_s`` (with its
            log); the process is stopped first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({srv.proc.returncode}):\n{srv.log()}")
        try:
            if httpx.get(f"{srv.url}{path}", headers=headers, timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(srv)
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s:\n{srv.log()}")


def stop_server(srv: LocalServer) -> None:
    """SIGINT (graceful), then SIGKILL after 20 s."""
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGINT)
        try:
            srv.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
