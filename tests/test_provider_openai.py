"""External models on the OpenAI-compatible providers: ``openai`` (OpenAI, Azure, Azure AD),
``custom`` and ``databricks-model-serving``, against the fake in ``tests/fakes/openai.py``.

Every test asserts the exact request fmserve sent upstream and drives the gateway with the
real ``openai`` client (plus databricks-sdk and mlflow where noted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server, create_external
from tests.fakes import openai as fake_openai
from tests.fakes.server import FakeServer

KEY = fake_openai.API_KEY
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fake_openai.fake() as server:
        yield server


@pytest.fixture(scope="module")
def ep(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "openai-chat", fake_openai.external_model(fake.url))
    return "openai-chat"


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/serving-endpoints", api_key=gateway.token,
                         max_retries=0)


def sent(fake: FakeServer) -> dict[str, Any]:
    return fake.last().json()  # type: ignore[no-any-return]


def stream_all(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(stream=True, **kw))


def joined(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- plain chat ------------------------------------------------------------------------------
def test_plain_chat_request_and_answer(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=50, temperature=0.2, seed=7)
    rec = fake.last()
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.json() == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 50, "temperature": 0.2, "seed": 7}
    assert r.model == ep and r.id.startswith("chatcmpl-") and r.id != "chatcmpl-fake"
    assert r.choices[0].message.content == "Echo: hi [system: ] [turns: 1] [images: 0]"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens > 0


def test_system_prompt_multi_turn_and_n(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    r = client.chat.completions.create(model=ep, messages=msgs, n=2)  # type: ignore[arg-type]
    assert sent(fake)["messages"] == msgs and sent(fake)["n"] == 2
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].message.content == "Echo: c [system: Be brief.] [turns: 3] [images: 0]"


def test_extra_params_merged_and_unknown_param_rejected(client: openai.OpenAI, fake: FakeServer,
                                                        ep: str) -> None:
    client.chat.completions.create(model=ep, messages=[{"role": "user", "content": "x"}],
                                   extra_body={"extra_params": {"service_tier": "flex"}})
    assert sent(fake)["service_tier"] == "flex" and "extra_params" not in sent(fake)
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(model=ep, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"top_k": 5})


# -- streaming -------------------------------------------------------------------------------
def test_stream_plain(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    chunks = stream_all(client, model=ep, messages=[{"role": "user", "content": "hello"}])
    assert sent(fake)["stream"] is True
    assert sent(fake)["stream_options"] == {"include_usage": True}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert joined(chunks) == "Echo: hello [system: ] [turns: 1] [images: 0]"
    assert all(c.usage is not None for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert all(c.id == chunks[0].id and c.model == ep for c in chunks)
