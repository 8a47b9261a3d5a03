"""A real fmserve server on 127.0.0.1 with the bundled models, for the client tests.

``server`` is session-wide: one ``fmserve serve`` subprocess (the same command a
user runs) with a fresh data dir and a token created by ``fmserve tokens create``.
Tests that break things (kill workers, fill queues) start their own with
:func:`start_server`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fmserve.testing import LocalServer, fmserve_cmd, free_port, start_server, stop_server

CHAT = "databricks-smollm2-135m-instruct"
EMBED = "databricks-all-minilm-l6-v2"


# One implementation for tests and benchmarks (fmserve.testing); re-exported here.
Server = LocalServer
__all__ = ["CHAT", "EMBED", "Server", "free_port", "fmserve_cmd", "start_server", "stop_server"]


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
