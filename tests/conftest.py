"""A real fmserve server on 127.0.0.1 with the bundled models, for the client tests.

``server`` is session-wide: one ``fmserve serve`` subprocess (the same command a
user runs) with a fresh data dir and a token created by ``fmserve tokens create``.
Tests that break things (kill workers, fill queues) start their own with
:func:`start_server`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fmserve.testing import LocalServer, fmserve_cmd, free_port, start_server, stop_server

CHAT = "databricks-smollm2-135m-instruct"
EMBED = "databricks-all-minilm-l6-v2"


# One implementation for tests and benchmarks (fmserve.testing); re-exported here.
Server = LocalServer
__all__ = ["CHAT", "EMBED", "Server", "free_port", "fmserve_cmd", "start_server", "stop_server",
           "wait_for"]


def wait_for(check: Callable[[], Any], timeout_s: float = 120, what: str = "condition") -> Any:
    """Polls ``check`` every 0.1 s until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# Env vars that would make the SDK or mlflow pick another auth method, profile or database.
_FOREIGN_ENV = ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_ID",
                "DATABRICKS_CLIENT_SECRET", "DATABRICKS_USERNAME", "DATABRICKS_PASSWORD",
                "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_AUTH_TYPE", "DATABRICKS_ACCOUNT_ID",
                "DATABRICKS_WORKSPACE_ID", "DATABRICKS_DISCOVERY_URL", "MLFLOW_TRACKING_URI",
                "FMSERVE_DATABASE_URL")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for var in _FOREIGN_ENV:
        monkeypatch.delenv(var, raising=False)
    # Never read the developer's ~/.databrickscfg.
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE",
                       str(tmp_path_factory.getbasetemp() / "no-databrickscfg"))


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
