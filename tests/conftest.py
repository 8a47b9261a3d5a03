"""A real fmserve server on 127.0.0.1 with the bundled models, for the client tests.

``server`` is session-wide: one ``fmserve serve`` subprocess (the same command a
user runs) with a fresh data dir and a token created by ``fmserve tokens create``.
Tests that break things (kill workers, fill queues) start their own with
:func:`start_server`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

CHAT = "databricks-smollm2-135m-instruct"
EMBED = "databricks-all-minilm-l6-v2"


@dataclass
class Server:
    url: str
    token: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self, **kw) -> httpx.Client:  # type: ignore[no-untyped-def]
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"Authorization": f"Bearer {self.token}"}, **kw)

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fmserve_cmd() -> list[str]:
    return [sys.executable, "-m", "fmserve"]


def start_server(tmp: Path, env_extra: dict[str, str] | None = None,
                 timeout_s: float = 180) -> Server:
    data_dir = tmp / "data"
    env = dict(os.environ, FMSERVE_HOME=str(data_dir), **(env_extra or {}))
    env.pop("DATABRICKS_TOKEN", None)
    token = subprocess.run(fmserve_cmd() + ["tokens", "create", "--comment", "tests"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    token = token.splitlines()[-1]
    port = free_port()
    log_path = tmp / "server.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(fmserve_cmd() + ["serve", "--port", str(port)], env=env,
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    srv = Server(f"http://127.0.0.1:{port}", token, data_dir, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fmserve serve exited ({proc.returncode}):\n{srv.log()}")
        try:
            if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(srv)
    raise RuntimeError(f"fmserve serve did not become healthy:\n{srv.log()}")


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGINT)
        try:
            srv.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-test-"))
    srv = start_server(tmp)
    try:
        yield srv
    finally:
        stop_server(srv)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
