"""External models on provider ``cohere`` (v2 chat / embed) against ``tests/fakes/cohere.py``.

Every test asserts the exact request fmserve sent upstream; the gateway is driven with the
real ``openai`` client (and databricks-sdk once). Images and reasoning are declared
unsupported for cohere: they are 400s that never reach the provider.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import Server, create_external, openai_for
from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from fakes import cohere as fake_cohere
from fakes.server import FakeServer

KEY = fake_cohere.KEY
MODEL = "command-r-plus-08-2024"
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME: Any = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}
SCHEMA: Any = {"type": "object", "properties": {"city": {"type": "string"},
                                           "days": {"type": "integer"}},
          "required": ["city", "days"]}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fake_cohere.fake() as server:
        yield server


@pytest.fixture(scope="module")
def ep(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "cohere-chat", fake_cohere.external_model(fake.url))
    return "cohere-chat"


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai_for(gateway)


def sent(fake: FakeServer) -> dict[str, Any]:
    return fake.last().json()  # type: ignore[no-any-return]


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


def stream_all(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(stream=True, **kw))


def joined(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_plain_chat_request_and_answer(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=user("hello"))
    rec = fake.last()
    assert (rec.method, rec.path) == ("POST", "/v2/chat")
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.json() == {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    assert r.choices[0].message.content == "Echo: hello [system: ] [turns: 1] [images: 0]"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    # usage.tokens (what the model processed, template included) wins over billed_units
    assert r.usage.prompt_tokens == 6 + fake_cohere.TEMPLATE_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_system_multi_turn_and_sampling(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(
        model=ep, max_tokens=50, temperature=0.3, top_p=0.9, seed=7, stop=["END"],
        frequency_penalty=0.1, presence_penalty=0.2, extra_body={"top_k": 40},
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "again"}])
    assert sent(fake) == {
        "model": MODEL, "max_tokens": 50, "temperature": 0.3, "p": 0.9, "k": 40, "seed": 7,
        "frequency_penalty": 0.1, "presence_penalty": 0.2, "stop_sequences": ["END"],
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "again"}]}
    assert r.choices[0].message.content == "Echo: again [system: Be brief.] [turns: 3] [images: 0]"


def test_extra_params_n_and_unsupported_param(client: openai.OpenAI, fake: FakeServer,
                                              ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=user("x"), n=2,
                                       extra_body={"extra_params": {"safety_mode": "OFF"}})
    assert sent(fake)["safety_mode"] == "OFF"
    assert [c.index for c in r.choices] == [0, 1]
    count = len(fake.requests)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=ep, messages=user("x"), logit_bias={"1": 2})
    assert len(fake.requests) == count


def test_max_tokens_finish_length(client: openai.OpenAI, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=user("a long question"), max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_tools_auto_parallel_and_result_turn(client: openai.OpenAI, fake: FakeServer,
                                             ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=user("weather in Paris?"),
                                       tools=[WEATHER])
    body = sent(fake)
    assert body["tools"] == [WEATHER] and "tool_choice" not in body
    msg: Any = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    call_id = msg.tool_calls[0].id

    r = client.chat.completions.create(model=ep, messages=user("parallel weather"),
                                       tools=[WEATHER, TIME])
    calls: list[Any] = list(r.choices[0].message.tool_calls or [])
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2

    r = client.chat.completions.create(model=ep, tools=[WEATHER], messages=[
        *user("weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21C"}])
    assert sent(fake)["messages"][1:] == [
        {"role": "assistant", "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21C"}]
    assert r.choices[0].message.content == "Tool said: sunny, 21C"

    with pytest.raises(openai.BadRequestError, match="parallel_tool_calls"):
        client.chat.completions.create(model=ep, messages=user("weather"), tools=[WEATHER],
                                       parallel_tool_calls=False)


def test_tool_choice_required_named_none(client: openai.OpenAI, fake: FakeServer,
                                         ep: str) -> None:
    client.chat.completions.create(model=ep, messages=user("hi"), tools=[WEATHER, TIME],
                                   tool_choice="required")
    assert sent(fake)["tool_choice"] == "REQUIRED" and len(sent(fake)["tools"]) == 2
    r = client.chat.completions.create(
        model=ep, messages=user("hi"), tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert sent(fake)["tools"] == [TIME] and sent(fake)["tool_choice"] == "REQUIRED"
    forced: Any = (r.choices[0].message.tool_calls or [])[0]
    assert forced.function.name == "get_time"
    r = client.chat.completions.create(model=ep, messages=user("weather?"), tools=[WEATHER],
                                       tool_choice="none")
    assert sent(fake)["tool_choice"] == "NONE"
    assert r.choices[0].message.tool_calls is None


def test_json_schema_and_json_object(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=user("plan a trip"), response_format={
        "type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    assert sent(fake)["response_format"] == {"type": "json_object", "json_schema": SCHEMA}
    assert json.loads(r.choices[0].message.content or "") == {"city": "Paris", "days": 3}
    client.chat.completions.create(model=ep, messages=user("json"),
                                   response_format={"type": "json_object"})
    assert sent(fake)["response_format"] == {"type": "json_object"}


def test_stream_text(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    chunks = stream_all(client, model=ep, messages=user("hello"))
    assert sent(fake) == {"model": MODEL, "stream": True,
                          "messages": [{"role": "user", "content": "hello"}]}
    assert fake.last().headers["accept"] == "text/event-stream"
    assert joined(chunks) == "Echo: hello [system: ] [turns: 1] [images: 0]"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.prompt_tokens == 6 + fake_cohere.TEMPLATE_TOKENS


def test_stream_tools_and_json(client: openai.OpenAI, ep: str) -> None:
    chunks = stream_all(client, model=ep, messages=user("parallel weather"),
                        tools=[WEATHER, TIME])
    calls: dict[int, dict[str, str]] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name,
                                                "args": ""})
            entry["args"] += tc.function.arguments or ""
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert all(c["id"] for c in calls.values())
    assert json.loads(calls[1]["args"]) == {"tz": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert joined(chunks) == ""  # tool_plan is not content
    chunks = stream_all(client, model=ep, messages=user("plan"), response_format={
        "type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    assert json.loads(joined(chunks)) == {"city": "Paris", "days": 3}


def test_images_and_thinking_are_400_before_any_call(client: openai.OpenAI, fake: FakeServer,
                                                     ep: str) -> None:
    count = len(fake.requests)
    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    with pytest.raises(openai.BadRequestError, match="Image input is not supported"):
        client.chat.completions.create(model=ep, messages=image)  # type: ignore[arg-type]
    for kw in ({"extra_body": {"thinking": {"type": "enabled", "budget_tokens": 2048}},
                "max_tokens": 4096}, {"reasoning_effort": "high"}):
        with pytest.raises(openai.BadRequestError, match="Reasoning"):
            client.chat.completions.create(model=ep, messages=user("think"), **kw)
        with pytest.raises(openai.BadRequestError, match="Reasoning"):
            stream_all(client, model=ep, messages=user("think"), **kw)
    history = [*user("q"), {"role": "assistant", "content": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm",
                                           "signature": "sig"}]},
        {"type": "text", "text": "a"}]}, *user("q2")]
    with pytest.raises(openai.BadRequestError, match="reasoning content"):
        client.chat.completions.create(model=ep, messages=history)  # type: ignore[arg-type]
    assert len(fake.requests) == count


@pytest.mark.parametrize("stream", [False, True])
def test_provider_errors(client: openai.OpenAI, ep: str, stream: bool) -> None:
    def call(text: str) -> Any:
        if stream:
            return stream_all(client, model=ep, messages=user(text))
        return client.chat.completions.create(model=ep, messages=user(text))

    with pytest.raises(openai.BadRequestError, match="invalid request: the fake"):
        call("FAIL:400")
    with pytest.raises(openai.AuthenticationError, match="invalid api token"):
        call("FAIL:401")
    with pytest.raises(openai.RateLimitError, match="Trial key") as ei:
        call("FAIL:429")
    assert ei.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.InternalServerError, match="internal server error") as e5:
        call("FAIL:500")
    assert e5.value.status_code == 502
    with pytest.raises(openai.APIStatusError) as et:
        call("FAIL:timeout")
    assert et.value.status_code == 504


def test_stream_reset_ends_with_error_event(client: openai.OpenAI, ep: str) -> None:
    stream = client.chat.completions.create(model=ep, messages=user("FAIL:reset"), stream=True)
    got = []
    with pytest.raises(openai.APIError, match="broke"):
        for ch in stream:
            got.append(ch)
    assert got and got[0].choices[0].delta.role == "assistant"


def test_embeddings(gateway: Server, client: openai.OpenAI, fake: FakeServer) -> None:
    create_external(gateway, "cohere-embed", fake_cohere.external_model(
        fake.url, "llm/v1/embeddings", "embed-english-v3.0"))
    r = client.embeddings.create(model="cohere-embed", input=["a cat", "a dog"])
    rec = fake.last()
    assert (rec.path, rec.headers["authorization"]) == ("/v2/embed", f"Bearer {KEY}")
    assert rec.json() == {"model": "embed-english-v3.0", "texts": ["a cat", "a dog"],
                          "input_type": "search_document", "embedding_types": ["float"]}
    assert [len(d.embedding) for d in r.data] == [8, 8]
    assert r.data[0].embedding[:2] == pytest.approx(fake_cohere._vector("a cat", 2))
    assert r.usage.prompt_tokens == 2
    r = client.embeddings.create(model="cohere-embed", input=[f"t{i}" for i in range(100)],
                                 dimensions=4, extra_body={"extra_params": {
                                     "input_type": "search_query"}})
    assert len(r.data) == 100 and len(r.data[99].embedding) == 4
    batches = [q.json() for q in fake.requests[-2:]]
    assert sorted(len(b["texts"]) for b in batches) == [4, 96]
    assert {(b["input_type"], b["output_dimension"]) for b in batches} == {("search_query", 4)}
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="cohere-embed", input="FAIL:429")


def test_completions_task(gateway: Server, client: openai.OpenAI, fake: FakeServer) -> None:
    create_external(gateway, "cohere-complete",
                    fake_cohere.external_model(fake.url, "llm/v1/completions"))
    r = client.completions.create(model="cohere-complete", prompt="Say hi", max_tokens=20)
    assert sent(fake)["messages"] == [{"role": "user", "content": "Say hi"}]
    assert r.choices[0].text.startswith("Echo: Say hi")
    chunks = list(client.completions.create(model="cohere-complete", prompt="s", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("Echo: s")


def test_databricks_sdk_query_and_key_never_shown(gateway: Server, fake: FakeServer,
                                                  ep: str) -> None:
    ws = WorkspaceClient(host=gateway.url, token=gateway.token)
    r = ws.serving_endpoints.query(
        ep, messages=[ChatMessage(role=ChatMessageRole.USER, content="from sdk")])
    assert r.choices and r.choices[0].message is not None
    assert (r.choices[0].message.content or "").startswith("Echo: from sdk")
    with gateway.client() as c:
        for path in (f"/api/2.0/serving-endpoints/{ep}", "/api/2.0/serving-endpoints"):
            text = c.get(path).text
            assert KEY not in text
        shown = c.get(f"/api/2.0/serving-endpoints/{ep}").json()
        config = shown["config"]["served_entities"][0]["external_model"]["cohere_config"]
        assert config == {"cohere_api_base": fake.url}  # *_plaintext never shown
    assert KEY not in gateway.log()


def test_answer_not_matching_response_format_is_502(client: openai.OpenAI, ep: str) -> None:
    # extra_params override what fmserve sent: the fake then answers plain text.
    kw: Any = {"model": ep, "messages": user("plan"), "extra_body": {
        "extra_params": {"response_format": {"type": "text"}}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "t",
                                                                   "schema": SCHEMA}}}
    with pytest.raises(openai.InternalServerError, match="not valid JSON") as ei:
        client.chat.completions.create(**kw)
    assert ei.value.status_code == 502
    with pytest.raises(openai.APIError, match="not valid JSON"):
        stream_all(client, **kw)


def test_config_without_key_is_400(gateway: Server) -> None:
    with gateway.client() as c:
        r = c.post("/api/2.0/serving-endpoints", json={"name": "cohere-nokey", "config": {
            "served_entities": [{"external_model": {
                "provider": "cohere", "name": MODEL, "task": "llm/v1/chat",
                "cohere_config": {"cohere_api_base": "http://127.0.0.1:9"}}}]}})
    assert r.status_code == 400, r.text
    assert "cohere_api_key" in r.json()["message"]
