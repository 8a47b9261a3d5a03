"""A real fmserve server on 127.0.0.1 with the bundled models, for the client tests.

``server`` is session-wide: one ``fmserve serve`` subprocess (the same command a
user runs) with a fresh data dir and a token of the first admin created by ``fmserve admin-token``.
Tests that break things (kill workers, fill queues) start their own with
:func:`start_server`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from fmserve.testing import LocalServer, fmserve_cmd, free_port, start_server, stop_server

CHAT = "databricks-smollm2-135m-instruct"
EMBED = "databricks-all-minilm-l6-v2"


# One implementation for tests and benchmarks (fmserve.testing); re-exported here.
Server = LocalServer
__all__ = ["CHAT", "EMBED", "Server", "free_port", "fmserve_cmd", "gateway_server",
           "postgres_database", "start_server", "stop_server", "wait_for"]


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


# PostgreSQL for tests: the database every machine (CI's included) runs.
POSTGRES_ADMIN_URL = os.environ.get("FMSERVE_TEST_POSTGRES_URL",
                                    "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_database(prefix: str, required: bool = False) -> Iterator[str]:
    """A fresh database named ``prefix_<random>`` on :data:`POSTGRES_ADMIN_URL` (its URL),
    dropped afterwards. Without PostgreSQL: the test fails when ``required`` or under
    ``CI``, else it is skipped."""
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if required:
            pytest.fail(f"this test needs PostgreSQL at {POSTGRES_ADMIN_URL} "
                        f"(FMSERVE_TEST_POSTGRES_URL): {exc}")
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}")
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def gateway_server(prefix: str, env_extra: dict[str, str] | None = None) -> Iterator[Server]:
    """A ``fmserve serve --no-bundled`` server (the gateway alone, no local models) in a
    fresh data dir named ``prefix…`` (``env_extra``: its extra environment); stopped and
    its data dir removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    srv = start_server(tmp, env_extra=env_extra, serve_args=("--no-bundled",))
    try:
        yield srv
    finally:
        stop_server(srv)
        shutil.rmtree(tmp, ignore_errors=True)


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


@pytest.fixture(scope="session")
def gateway() -> Iterator[Server]:
    """An fmserve server without local models (``--no-bundled``): external models only.

    Providers time out after 3 s here so timeout tests are quick.
    """
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-gw-"))
    srv = start_server(tmp, env_extra={"FMSERVE_EXTERNAL_TIMEOUT_S": "3"},
                       serve_args=("--no-bundled",))
    try:
        yield srv
    finally:
        stop_server(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def openai_for(srv: Server, **kw: Any) -> OpenAI:
    """The real ``openai`` client on ``srv``'s ``/serving-endpoints`` (no retries)."""
    return OpenAI(base_url=f"{srv.url}/serving-endpoints", api_key=srv.token, max_retries=0,
                  **kw)


def create_external(srv: Server, name: str, external_model: dict[str, Any],
                    entity_name: str | None = None) -> dict[str, Any]:
    """Create (or replace) endpoint ``name`` serving one external model; wait until READY."""
    with srv.client() as c:
        c.delete(f"/api/2.0/serving-endpoints/{name}")
        entity: dict[str, Any] = {"external_model": external_model}
        if entity_name:
            entity["name"] = entity_name
        r = c.post("/api/2.0/serving-endpoints",
                   json={"name": name, "config": {"served_entities": [entity]}})
        assert r.status_code == 200, r.text
        return wait_for(  # type: ignore[no-any-return]
            lambda: (lambda ep: ep if ep["state"]["ready"] == "READY" else None)(
                c.get(f"/api/2.0/serving-endpoints/{name}").json()),
            timeout_s=30, what=f"endpoint {name} READY")
