"""Provider ``anthropic``: the exact Messages API requests fmserve sends and the answers
it gives back, driven with the real ``openai`` client (and databricks-sdk once) against
the fake Anthropic API in ``fakes/anthropic.py``."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import Server, create_external, openai_for
from fakes.anthropic import API_KEY, MODEL, external_model, fake
from fakes.server import FakeServer
from PIL import Image

from fmserve.providers.anthropic import ResponseTool, from_anthropic, stream_error

EP = "anthropic-chat"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"tz": {"type": "string"}}}}}
THINK = {"thinking": {"type": "enabled", "budget_tokens": 2048}}


@pytest.fixture(scope="module")
def ant() -> Iterator[FakeServer]:
    with fake() as f:
        yield f


@pytest.fixture(scope="module")
def ep(gateway: Server, ant: FakeServer) -> str:
    create_external(gateway, EP, external_model(ant.url))
    return EP


@pytest.fixture()
def client(gateway: Server) -> openai.OpenAI:
    return openai_for(gateway)


def chat(client: openai.OpenAI, ep: str, messages: list[Any], **kw: Any) -> Any:
    return client.chat.completions.create(model=ep, messages=messages, **kw)


def stream(client: openai.OpenAI, ep: str, messages: list[Any], **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(model=ep, messages=messages, stream=True, **kw))


def sent(ant: FakeServer) -> dict[str, Any]:
    return ant.last().json()  # type: ignore[no-any-return]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_plain_chat_exact_request(client: openai.OpenAI, ep: str, ant: FakeServer) -> None:
    r = chat(client, ep, user("hi"))
    assert r.choices[0].message.content == "Echo: hi [system: ] [turns: 1] [images: 0]"
    assert r.choices[0].finish_reason == "stop"
    rec = ant.last()
    assert (rec.method, rec.path) == ("POST", "/v1/messages")
    assert rec.headers["x-api-key"] == API_KEY
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["content-type"] == "application/json"
    assert "authorization" not in rec.headers
    assert rec.json() == {"model": MODEL, "max_tokens": 4096,
                          "messages": [{"role": "user",
                                        "content": [{"type": "text", "text": "hi"}]}]}
    # input_tokens + cache_read_input_tokens (the fake reports 2 cached)
    u = r.usage
    assert u is not None and u.prompt_tokens > 2 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_system_multi_turn_merged_sampling(client: openai.OpenAI, ep: str,
                                           ant: FakeServer) -> None:
    r = chat(client, ep, [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use French."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "   "},
        {"role": "user", "content": [{"type": "text", "text": "two"},
                                     {"type": "text", "text": ""}]},
        {"role": "user", "content": "three"}],
        temperature=0.5, top_p=0.9, stop=["ZZZ"], max_tokens=100, extra_body={"top_k": 7})
    body = sent(ant)
    assert body["system"] == "Be brief.\n\nUse French."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "two"},
                                     {"type": "text", "text": "three"}]}]
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"],
            body["stop_sequences"]) == (0.5, 0.9, 7, 100, ["ZZZ"])
    assert r.choices[0].message.content.startswith("Echo: twothree [system: Be brief.")


def test_stop_sequence_and_length(client: openai.OpenAI, ep: str) -> None:
    r = chat(client, ep, user("say Paris"), stop=["Paris"])
    assert r.choices[0].message.content == "Echo: say "
    assert r.choices[0].finish_reason == "stop"
    r = chat(client, ep, user("hello there"), max_tokens=2)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("choice", "wire"), [
    ("auto", {"type": "auto"}), ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"type": "tool", "name": "get_time"}),
])
def test_tools(client: openai.OpenAI, ep: str, ant: FakeServer, choice: Any,
               wire: dict[str, Any]) -> None:
    r = chat(client, ep, user("weather in Paris?"), tools=[WEATHER, TIME], tool_choice=choice)
    body = sent(ant)
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather for a city",
         "input_schema": WEATHER["function"]["parameters"]},  # type: ignore[index]
        {"name": "get_time", "input_schema": TIME["function"]["parameters"]}]  # type: ignore[index]
    assert body["tool_choice"] == wire
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    want = "get_time" if isinstance(choice, dict) else "get_weather"
    assert [c.function.name for c in msg.tool_calls] == [want]
    assert msg.tool_calls[0].id.startswith("toolu_")
    assert isinstance(json.loads(msg.tool_calls[0].function.arguments), dict)


def test_tool_choice_none_and_no_parallel(client: openai.OpenAI, ep: str,
                                          ant: FakeServer) -> None:
    r = chat(client, ep, user("weather?"), tools=[WEATHER], tool_choice="none")
    assert sent(ant)["tool_choice"] == {"type": "none"}
    assert r.choices[0].finish_reason == "stop"
    chat(client, ep, user("weather?"), tools=[WEATHER], parallel_tool_calls=False)
    assert sent(ant)["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_parallel_calls_and_tool_result_turn(client: openai.OpenAI, ep: str,
                                             ant: FakeServer) -> None:
    r = chat(client, ep, user("weather and time, in parallel"), tools=[WEATHER, TIME])
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    # The assistant turn as DatabricksOpenAI sends it back: content " " beside tool_calls.
    history = [*user("weather and time, in parallel"),
               {"role": "assistant", "content": " ", "tool_calls": [
                   {"id": c.id, "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                   for c in calls]},
               {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
               {"role": "tool", "tool_call_id": calls[1].id, "content": "noon"}]
    r = chat(client, ep, history, tools=[WEATHER, TIME])
    assert r.choices[0].message.content == "Tool said: noon"
    msgs = sent(ant)["messages"]
    assert msgs[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": c.id, "name": c.function.name,
         "input": json.loads(c.function.arguments)} for c in calls]}
    assert msgs[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"},
        {"type": "tool_result", "tool_use_id": calls[1].id, "content": "noon"}]}


def test_foreign_tool_call_ids_mapped_consistently(client: openai.OpenAI, ep: str,
                                                   ant: FakeServer) -> None:
    history = [*user("weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "fc:1.a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "fc:1.a", "content": "rain"}]
    assert chat(client, ep, history, tools=[WEATHER]).choices[0].message.content == \
        "Tool said: rain"
    msgs = sent(ant)["messages"]
    assert msgs[1]["content"][0]["id"] == msgs[2]["content"][0]["tool_use_id"] == "fc_1_a"


def test_thinking_answer_and_signed_replay(client: openai.OpenAI, ep: str,
                                           ant: FakeServer) -> None:
    r = chat(client, ep, user("why is the sky blue"), extra_body=THINK)
    body = sent(ant)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == 2048 + 4096
    content = r.choices[0].message.content
    assert isinstance(content, list)  # the openai client keeps the list as-is
    summary = content[0]["summary"][0]
    assert content[0]["type"] == "reasoning"
    assert summary["text"] == "Thinking about: why is the sky blue"
    assert summary["signature"].startswith("sig-")
    assert content[1]["type"] == "text" and content[1]["text"].startswith("Echo:")
    assert r.usage.reasoning_tokens == len(summary["text"]) // 4  # type: ignore[union-attr]
    # Second turn: the reasoning goes back first, signature intact; an unsigned reasoning
    # item (another provider's) is dropped: Anthropic would reject it.
    history = [*user("why is the sky blue"), {"role": "assistant", "content": content},
               {"role": "assistant", "content": [{"type": "reasoning", "summary": [
                   {"type": "summary_text", "text": "unsigned"}]}, {"type": "text",
                                                                    "text": "more"}]},
               *user("and at night?")]
    r2 = chat(client, ep, history, extra_body=THINK)
    assert sent(ant)["messages"][1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": summary["text"], "signature": summary["signature"]},
        {"type": "text", "text": content[1]["text"]}, {"type": "text", "text": "more"}]}
    assert r2.choices[0].message.content[1]["text"].startswith("Echo: and at night?")


def test_reasoning_effort_and_thinking_rules(client: openai.OpenAI, ep: str, ant: FakeServer,
                                             gateway: Server) -> None:
    chat(client, ep, user("hm"), reasoning_effort="low")
    assert sent(ant)["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    n = len(ant.requests)
    bad = [dict(max_tokens=1000, extra_body=THINK),
           dict(tools=[WEATHER], tool_choice="required", extra_body=THINK),
           dict(response_format={"type": "json_object"}, extra_body=THINK),
           dict(temperature=0.2, extra_body=THINK), dict(temperature=1.5)]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as exc:
            chat(client, ep, user("hm"), **kw)
        assert exc.value.status_code == 400
    assert len(ant.requests) == n  # refused before reaching Anthropic


def test_image(client: openai.OpenAI, ep: str, ant: FakeServer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (240, 220), (10, 200, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = chat(client, ep, [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": url}}]}])
    assert "[images: 1]" in r.choices[0].message.content
    block = sent(ant)["messages"][0]["content"][1]
    assert block["type"] == "image" and block["source"]["type"] == "base64"
    assert block["source"]["media_type"] == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(block["source"]["data"]))).size == (240, 220)


PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}


def test_json_schema_forced_tool(client: openai.OpenAI, ep: str, ant: FakeServer) -> None:
    r = chat(client, ep, user("a person"), response_format=PERSON)
    body = sent(ant)
    assert body["tools"][0]["name"] == "person"
    assert body["tools"][0]["input_schema"] == PERSON["json_schema"]["schema"]  # type: ignore[index]
    assert body["tool_choice"] == {"type": "tool", "name": "person"}
    assert json.loads(r.choices[0].message.content) == {"name": "Paris", "age": 3}
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    chunks = stream(client, ep, user("a person"), response_format=PERSON)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"name": "Paris", "age": 3}
    assert chunks[-1].choices[0].finish_reason == "stop"
    arr = {"type": "json_schema", "json_schema": {"name": "tags", "schema": {
        "type": "array", "items": {"type": "string"}}}}
    assert json.loads(chat(client, ep, user("tags"), response_format=arr)
                      .choices[0].message.content) == ["Paris"]
    r = chat(client, ep, user("obj"), response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {}


def test_stream_text(client: openai.OpenAI, ep: str, ant: FakeServer) -> None:
    chunks = stream(client, ep, user("stream me"))
    assert sent(ant)["stream"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me [system: ] [turns: 1] [images: 0]"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 2


def test_stream_tool_calls(client: openai.OpenAI, ep: str) -> None:
    chunks = stream(client, ep, user("weather, in parallel"), tools=[WEATHER, TIME])
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if tc.index not in calls:
                assert tc.id and tc.function.name  # id and name on the first delta
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "args": ""}
            else:
                assert tc.id is None
            calls[tc.index]["args"] += tc.function.arguments or ""
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["args"]) == {"city": "Paris"}
    assert json.loads(calls[1]["args"]) == {"tz": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stream_thinking_then_text_and_replay(client: openai.OpenAI, ep: str,
                                              ant: FakeServer) -> None:
    chunks = stream(client, ep, user("ponder"), extra_body=THINK)
    kinds, reasoning, signature, text = [], "", None, ""
    for c in chunks:
        content = c.choices[0].delta.content if c.choices else None
        if isinstance(content, list):
            kinds.append("reasoning")
            s = content[0]["summary"][0]
            reasoning += s["text"]
            signature = s.get("signature") or signature
        elif content:
            kinds.append("text")
            text += content
    assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert reasoning == "Thinking about: ponder" and signature
    assert chunks[-1].usage.reasoning_tokens == len(reasoning) // 4  # type: ignore[union-attr]
    history = [*user("ponder"), {"role": "assistant", "content": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": reasoning,
                                           "signature": signature}]},
        {"type": "text", "text": text}]}, *user("more")]
    chunks = stream(client, ep, history, extra_body=THINK)
    assert sent(ant)["messages"][1]["content"][0] == {
        "type": "thinking", "thinking": reasoning, "signature": signature}
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_completions(client: openai.OpenAI, ep: str, ant: FakeServer,
                           gateway: Server) -> None:
    n = len(ant.requests)
    r = chat(client, ep, user("twice"), n=2)
    assert [c.index for c in r.choices] == [0, 1] and len(ant.requests) == n + 2
    with pytest.raises(openai.BadRequestError):
        stream(client, ep, user("twice"), n=2)
    create_external(gateway, "anthropic-compl", external_model(ant.url, "llm/v1/completions"))
    c = client.completions.create(model="anthropic-compl", prompt="complete me")
    assert c.choices[0].text.startswith("Echo: complete me")
    assert sent(ant)["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "complete me"}]}]


def test_unsupported_param_and_bad_config(client: openai.OpenAI, ep: str,
                                          gateway: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="seed"):
        chat(client, ep, user("x"), seed=3)
    with gateway.client() as c:
        for cfg in ({}, {"anthropic_api_key_plaintext": "k", "anthropic_api_base": "ftp://x"}):
            r = c.post("/api/2.0/serving-endpoints", json={"name": "anthropic-bad", "config": {
                "served_entities": [{"external_model": {
                    "provider": "anthropic", "name": MODEL, "task": "llm/v1/chat",
                    "anthropic_config": cfg}}]}})
            assert r.status_code == 400, r.text


@pytest.mark.parametrize(("trigger", "status", "code"), [
    ("400", 400, "BAD_REQUEST"), ("401", 401, "UNAUTHENTICATED"),
    ("429", 429, "REQUEST_LIMIT_EXCEEDED"), ("500", 502, None),
    ("overloaded", 503, "TEMPORARILY_UNAVAILABLE"), ("timeout", 504, "DEADLINE_EXCEEDED"),
    ("reset", 502, None)])
def test_errors(gateway: Server, ep: str, trigger: str, status: int, code: str | None) -> None:
    with gateway.client() as c:
        r = c.post(f"/serving-endpoints/{ep}/invocations",
                   json={"messages": user(f"FAIL:{trigger}")})
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error_code"] == code
    if trigger == "429":
        assert r.headers["retry-after"] == "7"
        assert "per-minute rate limit" in r.json()["message"]
    assert API_KEY not in r.text


@pytest.mark.parametrize(("trigger", "code"), [("reset", "BAD_GATEWAY"),
                                               ("overloaded", "TEMPORARILY_UNAVAILABLE")])
def test_stream_breaks_mid_way(client: openai.OpenAI, gateway: Server, ep: str, trigger: str,
                               code: str) -> None:
    with pytest.raises(openai.APIError):
        stream(client, ep, user(f"FAIL:{trigger}"))
    with gateway.client() as c:
        r = c.post(f"/serving-endpoints/{ep}/invocations",
                   json={"messages": user(f"FAIL:{trigger}"), "stream": True})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-2])["error_code"] == code
    assert API_KEY not in r.text


def test_redacted_thinking_both_ways(client: openai.OpenAI, ep: str, ant: FakeServer) -> None:
    history = [*user("q"), {"role": "assistant", "content": [
        {"type": "reasoning", "summary": [{"type": "summary_encrypted_text", "data": "EnC"}]},
        {"type": "text", "text": "a"}]}, *user("q2")]
    chat(client, ep, history, extra_body=THINK)
    assert sent(ant)["messages"][1]["content"] == [{"type": "redacted_thinking", "data": "EnC"},
                                                   {"type": "text", "text": "a"}]
    ans, u = from_anthropic({"content": [
        {"type": "redacted_thinking", "data": "EnC"},
        {"type": "thinking", "thinking": "x" * 40, "signature": "s"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 5, "cache_creation_input_tokens": 3,
                                             "output_tokens": 7}}, ResponseTool())
    assert ans.message()["content"][0] == {"type": "reasoning", "summary": [
        {"type": "summary_encrypted_text", "data": "EnC"}]}
    assert ans.finish_reason == "tool_calls"  # never "stop" when a tool was called
    assert u == {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15,
                 "reasoning_tokens": 10}
    err = stream_error('{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}')
    assert (err.status_code, err.message) == (429, "anthropic returned HTTP 429: slow")


def test_databricks_sdk_and_key_never_shown(gateway: Server, ep: str) -> None:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service.serving import ChatMessage, ChatMessageRole

    ws = WorkspaceClient(host=gateway.url, token=gateway.token)
    r = ws.serving_endpoints.query(ep, messages=[ChatMessage(role=ChatMessageRole.USER,
                                                             content="from sdk")], max_tokens=50)
    assert r.choices[0].message.content.startswith("Echo: from sdk")
    with gateway.client() as c:
        shown = c.get(f"/api/2.0/serving-endpoints/{ep}").text + c.get(
            "/api/2.0/serving-endpoints").text
    assert API_KEY not in shown and API_KEY not in gateway.log()
