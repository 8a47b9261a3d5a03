"""The query routes' fast path (``api.query_routes.FastQueryPath``): same auth, errors,
headers and metrics as the FastAPI routes, for every query URL; other methods and paths
still reach FastAPI. Runs against the ``gateway`` fixture and the fake OpenAI upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Server, create_external
from fakes import openai as fake_openai

from fmserve.api import query_routes

EP = "fastpath-chat"
HI = [{"role": "user", "content": "hi"}]
CHAT_URLS = ["/serving-endpoints/chat/completions", "/v1/chat/completions"]
INVOKE_URLS = [f"/serving-endpoints/{EP}/invocations",
               f"/serving-endpoints/{EP}/served-models/gpt/invocations"]


@pytest.fixture(scope="module")
def ep(gateway: Server) -> Iterator[str]:
    with fake_openai.fake() as fake:
        create_external(gateway, EP, fake_openai.external_model(fake.url), entity_name="gpt")
        yield EP


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error_code"] == code, body
    return str(body["message"])


def _post(gateway: Server, url: str, body: dict, **kw) -> httpx.Response:  # type: ignore[no-untyped-def, type-arg]
    return httpx.post(gateway.url + url, json=body, timeout=30, **kw)


def _body(url: str) -> dict:  # type: ignore[type-arg]
    return {"messages": HI, **({"model": EP} if "invocations" not in url else {})}


@pytest.mark.parametrize("url", CHAT_URLS + INVOKE_URLS)
def test_answers_with_headers_and_metrics(gateway: Server, ep: str, url: str) -> None:
    r = _post(gateway, url, _body(url), headers=gateway.headers)
    assert r.status_code == 200, r.text
    assert r.headers["served-model-name"] == "gpt"
    assert r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["model"] == EP and out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"]
    metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    kind = "invocations" if "invocations" in url else "chat"
    assert f'fmserve_requests_total{{endpoint="{EP}",kind="{kind}",status="200"}}' in metrics


@pytest.mark.parametrize("url", CHAT_URLS + INVOKE_URLS)
def test_stream(gateway: Server, ep: str, url: str) -> None:
    with httpx.stream("POST", gateway.url + url, json={**_body(url), "stream": True},
                      headers=gateway.headers, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["served-model-name"] == "gpt"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


@pytest.mark.parametrize("header", [None, "Bearer dapi-not-a-token", "Bearer", "Token abc",
                                    "Basic !!!not-base64!!!"])
@pytest.mark.parametrize("url", CHAT_URLS + INVOKE_URLS)
def test_bad_credentials_are_401(gateway: Server, ep: str, url: str,
                                 header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    # a malformed body must not matter: authentication comes first
    r = httpx.post(gateway.url + url, content=b"{not json", headers=headers, timeout=30)
    assert "token" in _error(r, 401, "UNAUTHENTICATED").lower()


def test_basic_auth(gateway: Server, ep: str) -> None:
    r = _post(gateway, CHAT_URLS[0], _body(CHAT_URLS[0]), auth=("token", gateway.token))
    assert r.status_code == 200, r.text


def test_errors(gateway: Server, ep: str) -> None:
    h = gateway.headers
    r = httpx.post(gateway.url + CHAT_URLS[0], content=b"{not json", headers=h, timeout=30)
    _error(r, 400, "BAD_REQUEST")
    _error(_post(gateway, CHAT_URLS[1], {"model": "nope", "messages": HI}, headers=h), 404,
           "RESOURCE_DOES_NOT_EXIST")
    _error(_post(gateway, "/serving-endpoints/nope/invocations", {"messages": HI}, headers=h),
           404, "RESOURCE_DOES_NOT_EXIST")
    _error(_post(gateway, f"/serving-endpoints/{EP}/served-models/nope/invocations",
                 {"messages": HI}, headers=h), 404, "RESOURCE_DOES_NOT_EXIST")
    _error(_post(gateway, CHAT_URLS[0], {"messages": HI}, headers=h), 400,
           "INVALID_PARAMETER_VALUE")
    big = {"model": EP, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    _error(_post(gateway, CHAT_URLS[0], big, headers=h), 413, "BAD_REQUEST")


def test_other_methods_and_paths_reach_fastapi(gateway: Server, ep: str) -> None:
    h = gateway.headers
    r = httpx.get(gateway.url + CHAT_URLS[0], headers=h, timeout=30)
    _error(r, 405, "BAD_REQUEST")
    r = httpx.post(gateway.url + "/serving-endpoints//invocations", json={"messages": HI},
                   headers=h, timeout=30)
    assert r.status_code == 404, r.text
    r = httpx.get(gateway.url + "/v1/models", headers=h, timeout=30)
    assert EP in {m["id"] for m in r.json()["data"]}


class _Conn:
    """A stand-in for the ASGI request: ``receive`` says disconnect after ``after_s``."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s

    async def receive(self) -> dict:  # type: ignore[type-arg]
        await asyncio.sleep(self.after_s)
        return {"type": "http.disconnect"}


def test_until_disconnect_cancels_abandoned_work() -> None:
    async def main() -> None:
        cancelled = asyncio.Event()

        async def forever() -> Any:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(query_routes._ClientGone):
            await query_routes._until_disconnect(_Conn(0.05), forever())  # type: ignore[arg-type]
        await asyncio.wait_for(cancelled.wait(), 1)

        async def quick() -> Any:
            return ("e", {"ok": 1}, {})

        conn = _Conn(3600)
        assert await query_routes._until_disconnect(conn, quick()) == ("e", {"ok": 1}, {})  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == 1  # the disconnect watcher is gone

        async def failing() -> Any:
            raise query_routes.FmserveError("boom")

        with pytest.raises(query_routes.FmserveError):
            await query_routes._until_disconnect(conn, failing())  # type: ignore[arg-type]

    asyncio.run(main())
