"""fmserve.client: the one client of fmserve's API (CLI, SQL, batch, benchmarks, tests)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import httpx
import pytest

from fmserve.client import ApiError, ApiUnreachable, AsyncClient, Client, resolve, retry_after_s
from fmserve.testing import LocalServer, free_port

CHAT = "databricks-smollm2-135m-instruct"


def test_real_server_rest_and_query(server: LocalServer) -> None:
    with server.api() as c:
        names = {ep["name"] for ep in c.list_endpoints()}
        assert CHAT in names
        assert c.get_endpoint(CHAT)["task"] == "llm/v1/chat"
        out = c.query(CHAT, {"messages": [{"role": "user", "content": "Say hi"}],
                             "max_tokens": 5, "temperature": 0})
        assert out["choices"][0]["message"]["content"]
        assert out["usage"]["completion_tokens"] <= 5
        with pytest.raises(ApiError) as e:
            c.get_endpoint("no-such-endpoint")
        assert (e.value.status, e.value.error_code) == (404, "RESOURCE_DOES_NOT_EXIST")
    with Client(server.url, "dapi-wrong") as bad, pytest.raises(ApiError) as e:
        bad.list_endpoints()
    assert e.value.status == 401


def test_async_client_bounds_concurrency_on_a_real_server(server: LocalServer) -> None:
    async def run() -> list[dict[str, Any]]:
        async with AsyncClient(server.url, server.token, max_concurrency=2) as c:
            body = {"messages": [{"role": "user", "content": "Count to 3"}],
                    "max_tokens": 4, "temperature": 0}
            return await asyncio.gather(*(c.query(CHAT, body) for _ in range(5)))

    outs = asyncio.run(run())
    assert len(outs) == 5 and all(o["choices"][0]["message"]["content"] for o in outs)


def test_auth_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABRICKS_HOST", raising=False)
    monkeypatch.delenv("DATABRICKS_TOKEN", raising=False)
    assert resolve() == ("http://127.0.0.1:8080", None)
    monkeypatch.setenv("DATABRICKS_HOST", "adb-123.azuredatabricks.net/")
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-x")
    assert resolve() == ("https://adb-123.azuredatabricks.net", "dapi-x")
    assert resolve("http://h:1", "t") == ("http://h:1", "t")
    with Client() as c:
        assert c.http.headers["authorization"] == "Bearer dapi-x"


def test_retry_after_is_honoured_on_429_and_503() -> None:
    seen: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.2"},
                                  json={"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "x"})
        if len(seen) == 2:
            return httpx.Response(503, json={"error_code": "TEMPORARILY_UNAVAILABLE",
                                             "message": "restarting"})
        return httpx.Response(200, json={"ok": True})

    with Client("http://fmserve.test", "t", max_wait_s=0.3,
                transport=httpx.MockTransport(answer)) as c:
        assert c.request("POST", "/x", json={}) == {"ok": True}
    assert len(seen) == 3
    assert seen[1] - seen[0] >= 0.19  # Retry-After: 0.2
    assert seen[2] - seen[1] >= 0.29  # none given: 1 s, capped by max_wait_s

    c = Client("http://fmserve.test", "t", max_retries=1, max_wait_s=0,
               transport=httpx.MockTransport(lambda r: httpx.Response(
                   429, json={"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow"})))
    with pytest.raises(ApiError) as e:
        c.request("GET", "/x")
    assert (e.value.status, e.value.error_code, e.value.message) == \
        (429, "REQUEST_LIMIT_EXCEEDED", "slow")


def test_retry_after_forms() -> None:
    def r(value: str | None) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value} if value else {})

    assert retry_after_s(r("3"), 60) == 3
    assert retry_after_s(r(None), 60) == 1
    assert retry_after_s(r("999"), 60) == 60
    assert retry_after_s(r("soon"), 60) == 1
    later = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3 <= retry_after_s(r(later), 60) <= 5


def test_unreachable_server_is_a_clear_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "t", max_retries=0) as c, \
            pytest.raises(ApiUnreachable, match="Cannot reach"):
        c.list_endpoints()
