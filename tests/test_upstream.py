"""The provider transport's pieces on their own: error mapping, cached OAuth tokens,
answers assembled from single chat calls."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from fmserve.errors import BadGateway, DeadlineExceeded, RequestLimitExceeded
from fmserve.oauth_tokens import TokenSource
from fmserve.providers import over_chat
from fmserve.providers.upstream import map_upstream_errors


def _scrub(text: str) -> str:
    return text.replace("sk-secret", "[REDACTED]")


def test_errors_mapped_in_one_place() -> None:
    with pytest.raises(DeadlineExceeded, match="openai did not answer within 5 s"):
        with map_upstream_errors("openai", 5, _scrub):
            raise TimeoutError
    with pytest.raises(BadGateway, match=r"connection failed: .*\[REDACTED\]"):
        with map_upstream_errors("openai", 5, _scrub):
            raise aiohttp.ClientConnectionError("refused with sk-secret")
    with pytest.raises(RequestLimitExceeded) as info:
        with map_upstream_errors("openai", 5, _scrub):
            raise RequestLimitExceeded("slow down sk-secret", retry_after=1)
    assert info.value.message == "slow down [REDACTED]"  # what the error body carries
    with pytest.raises(BadGateway, match="The stream from openai broke: openai connection"):
        with map_upstream_errors("openai", 5, _scrub, midstream=True):
            raise aiohttp.ClientPayloadError("reset")
    with pytest.raises(KeyError):  # mid-stream, only transport failures are mapped
        with map_upstream_errors("openai", 5, _scrub, midstream=True):
            raise KeyError("parser bug")
    with pytest.raises(asyncio.CancelledError):
        with map_upstream_errors("openai", 5, _scrub):
            raise asyncio.CancelledError


def test_token_source_caches_until_the_margin_and_shares_one_fetch() -> None:
    now = [0.0]
    calls: list[int] = []
    seen: list[str] = []

    async def fetch() -> Any:
        calls.append(1)
        await asyncio.sleep(0)
        return {"access_token": f"tok-{len(calls)}", "expires_in": 3600}

    async def run() -> None:
        source = TokenSource("Test IdP", fetch, on_token=seen.append, clock=lambda: now[0])
        assert await asyncio.gather(*(source.token() for _ in range(5))) == ["tok-1"] * 5
        now[0] = 3299.0
        assert await source.token() == "tok-1"
        now[0] = 3300.0  # 5 minutes before expiry
        assert await source.token() == "tok-2"
    asyncio.run(run())
    assert len(calls) == 2 and seen == ["tok-1", "tok-2"]


def test_token_source_without_access_token_is_502() -> None:
    async def fetch() -> Any:
        return {"token_type": "Bearer"}

    with pytest.raises(BadGateway, match="Test IdP answered without an access_token"):
        asyncio.run(TokenSource("Test IdP", fetch).token())


def test_n_single_answers_merged() -> None:
    one = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a"},
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
    merged = over_chat.merge_choices([one, one, one])
    assert [c["index"] for c in merged["choices"]] == [0, 1, 2]
    assert merged["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
    text = over_chat.completion_of([merged])
    assert [c["text"] for c in text["choices"]] == ["a", "a", "a"]
    assert text["usage"] == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
