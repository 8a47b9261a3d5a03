"""amazon-bedrock external models against a fake Bedrock runtime (tests/fakes/bedrock.py).

The fake recomputes every SigV4 signature, so each successful call proves the signing;
streams are real event-stream frames decoded by botocore.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Server, create_external, openai_for
from databricks.sdk import WorkspaceClient
from fakes import bedrock
from fakes.server import FakeServer
from openai import OpenAI
from PIL import Image

MODEL_PATH = "/model/anthropic.claude-3-5-sonnet-20240620-v1:0"
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME: Any = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string"}}, "required": ["tz"]}}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with bedrock.fake() as f:
        yield f


@pytest.fixture(scope="module")
def chat_ep(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "bedrock-chat", bedrock.external_model(fake.url))
    return "bedrock-chat"


@pytest.fixture(scope="module")
def client(gateway: Server) -> OpenAI:
    return openai_for(gateway, timeout=20)


def sent(fake: FakeServer) -> dict[str, Any]:
    rec = fake.last()
    assert rec.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={bedrock.KEY_ID}/")
    assert "/us-west-2/bedrock/aws4_request" in rec.headers["authorization"]
    assert rec.headers["x-amz-date"] and rec.headers["content-type"] == "application/json"
    return rec.json()  # type: ignore[no-any-return]


def stream(client: OpenAI, ep: str, **kw: Any) -> tuple[list[Any], str, list[Any]]:
    chunks = list(client.chat.completions.create(model=ep, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices
                   and isinstance(c.choices[0].delta.content, str))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    return chunks, text, calls


def test_plain_chat_signed_converse(client: OpenAI, chat_ep: str, fake: FakeServer) -> None:
    r = client.chat.completions.create(model=chat_ep, max_tokens=50, temperature=0.2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Echo: hi [system: ] [turns: 1] [images: 0]"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    rec = fake.last()
    assert rec.path == MODEL_PATH + "/converse" and rec.method == "POST"
    assert sent(fake) == {"messages": [{"role": "user", "content": [{"text": "hi"}]}],
                          "inferenceConfig": {"maxTokens": 50, "temperature": 0.2}}


def test_system_multi_turn_stop(client: OpenAI, chat_ep: str, fake: FakeServer) -> None:
    r = client.chat.completions.create(model=chat_ep, stop=["END"], top_p=0.9, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert r.choices[0].message.content == "Echo: c [system: Be brief.] [turns: 3] [images: 0]"
    assert sent(fake) == {
        "system": [{"text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"text": "a"}]},
                     {"role": "assistant", "content": [{"text": "b"}]},
                     {"role": "user", "content": [{"text": "c"}]}],
        "inferenceConfig": {"topP": 0.9, "stopSequences": ["END"]}}


def test_wrong_secret_is_rejected_by_signature_check(gateway: Server, fake: FakeServer) -> None:
    bad = bedrock.external_model(fake.url)
    bad["amazon_bedrock_config"]["aws_secret_access_key_plaintext"] = "not-the-secret-at-all"
    create_external(gateway, "bedrock-badsig", bad)
    with gateway.client() as c:
        r = c.post("/serving-endpoints/bedrock-badsig/invocations",
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 403 and r.json()["error_code"] == "PERMISSION_DENIED"
    assert "signature we calculated does not match" in r.json()["message"]


@pytest.mark.parametrize("choice,expect", [
    ("auto", {"auto": {}}), ("required", {"any": {}}),
    ({"type": "function", "function": {"name": "get_time"}}, {"tool": {"name": "get_time"}})])
def test_tools(client: OpenAI, chat_ep: str, fake: FakeServer, choice: Any,
               expect: dict[str, Any]) -> None:
    r = client.chat.completions.create(model=chat_ep, tools=[WEATHER, TIME], tool_choice=choice,
                                       messages=[{"role": "user", "content": "weather?"}])
    body = sent(fake)
    assert body["toolConfig"]["toolChoice"] == expect
    assert body["toolConfig"]["tools"][0] == {"toolSpec": {
        "name": "get_weather", "description": "Weather in a city",
        "inputSchema": {"json": WEATHER["function"]["parameters"]}}}
    msg: Any = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls and msg.tool_calls[0].id.startswith("call_")
    want = "get_time" if isinstance(choice, dict) else "get_weather"
    assert msg.tool_calls[0].function.name == want


def test_parallel_calls_then_tool_results(client: OpenAI, chat_ep: str,
                                          fake: FakeServer) -> None:
    r = client.chat.completions.create(model=chat_ep, tools=[WEATHER, TIME], messages=[
        {"role": "user", "content": "weather in parallel"}])
    calls: list[Any] = list(r.choices[0].message.tool_calls or [])
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    history: list[Any] = [{"role": "user", "content": "weather in parallel"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              c.model_dump() for c in calls]},
                          {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
                          {"role": "tool", "tool_call_id": calls[1].id, "content": '{"h": 9}'}]
    r2 = client.chat.completions.create(model=chat_ep, tools=[WEATHER, TIME], messages=history)
    assert r2.choices[0].message.content == 'Tool said: {"h": 9}'
    msgs = sent(fake)["messages"]
    assert msgs[1] == {"role": "assistant", "content": [
        {"toolUse": {"toolUseId": calls[0].id, "name": "get_weather", "input": {"city": "Paris"}}},
        {"toolUse": {"toolUseId": calls[1].id, "name": "get_time", "input": {"tz": "Paris"}}}]}
    assert msgs[2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": calls[0].id, "content": [{"text": "sunny"}],
                        "status": "success"}},
        {"toolResult": {"toolUseId": calls[1].id, "content": [{"json": {"h": 9}}],
                        "status": "success"}}]}


def test_tool_choice_none_omits_tools(client: OpenAI, chat_ep: str, fake: FakeServer) -> None:
    r = client.chat.completions.create(model=chat_ep, tools=[WEATHER], tool_choice="none",
                                       messages=[{"role": "user", "content": "weather?"}])
    assert "toolConfig" not in sent(fake)
    assert (r.choices[0].message.content or "").startswith("Echo")


def test_thinking_and_signature_round_trip(gateway: Server, chat_ep: str,
                                           fake: FakeServer) -> None:
    with gateway.client() as c:
        r = c.post(f"/serving-endpoints/{chat_ep}/invocations", json={
            "messages": [{"role": "user", "content": "why?"}], "max_tokens": 4000,
            "thinking": {"type": "enabled", "budget_tokens": 2048}}).json()
        body = sent(fake)
        assert body["additionalModelRequestFields"] == {
            "thinking": {"type": "enabled", "budget_tokens": 2048}}
        content = r["choices"][0]["message"]["content"]
        summary = content[0]["summary"][0]
        assert summary["text"] == "Thinking about: why?" and summary["signature"].startswith("sig-")
        assert content[1]["type"] == "text" and r["usage"]["completion_tokens"] > 0
        c.post(f"/serving-endpoints/{chat_ep}/invocations", json={"messages": [
            {"role": "user", "content": "why?"}, {"role": "assistant", "content": content},
            {"role": "user", "content": "more"}]}).raise_for_status()
    assert sent(fake)["messages"][1]["content"][0] == {"reasoningContent": {"reasoningText": {
        "text": "Thinking about: why?", "signature": summary["signature"]}}}


def test_image_block(client: OpenAI, chat_ep: str, fake: FakeServer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 240), "red").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.chat.completions.create(model=chat_ep, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert "[images: 1]" in (r.choices[0].message.content or "")
    block = sent(fake)["messages"][0]["content"][1]["image"]
    assert block["format"] == "png"
    assert Image.open(io.BytesIO(base64.b64decode(block["source"]["bytes"]))).size == (300, 240)


def test_json_schema_forced_tool(client: OpenAI, chat_ep: str, fake: FakeServer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    rf: Any = {"type": "json_schema", "json_schema": {"name": "num", "schema": schema}}
    r = client.chat.completions.create(model=chat_ep, response_format=rf,
                                       messages=[{"role": "user", "content": "count"}])
    assert json.loads(r.choices[0].message.content or "") == {"n": 3}
    assert r.choices[0].finish_reason == "stop"
    tc = sent(fake)["toolConfig"]
    assert tc["toolChoice"] == {"tool": {"name": "json_response"}}
    assert tc["tools"][0]["toolSpec"]["inputSchema"] == {"json": schema}
    _, text, _ = stream(client, chat_ep, response_format=rf,
                        messages=[{"role": "user", "content": "count"}])
    assert json.loads(text) == {"n": 3}


def test_stream_text(client: OpenAI, chat_ep: str, fake: FakeServer) -> None:
    chunks, text, _ = stream(client, chat_ep, messages=[{"role": "user", "content": "yo"}])
    assert fake.last().path == MODEL_PATH + "/converse-stream"
    assert fake.last().headers["accept"] == "application/vnd.amazon.eventstream"
    assert text == "Echo: yo [system: ] [turns: 1] [images: 0]"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage and chunks[-1].usage.prompt_tokens > 0


def test_stream_tools(client: OpenAI, chat_ep: str) -> None:
    chunks, _, calls = stream(client, chat_ep, tools=[WEATHER, TIME],
                              messages=[{"role": "user", "content": "weather in parallel"}])
    assert [(c.index, c.function.name) for c in calls if c.id] == [(0, "get_weather"),
                                                                    (1, "get_time")]
    args = "".join(c.function.arguments or "" for c in calls if c.index == 0)
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stream_thinking(gateway: Server, chat_ep: str) -> None:
    with gateway.client() as c, c.stream("POST", f"/serving-endpoints/{chat_ep}/invocations",
                                         json={"messages": [{"role": "user", "content": "q"}],
                                               "stream": True, "reasoning_effort": "low"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    items = [s for e in events for d in [e["choices"][0]["delta"]]
             if isinstance(d.get("content"), list) for s in d["content"][0]["summary"]]
    assert "".join(s["text"] for s in items) == "Thinking about: q"
    assert any(s.get("signature", "").startswith("sig-") for s in items)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("trigger,code", [
    ("BEDROCK:throttle-stream", "REQUEST_LIMIT_EXCEEDED"), ("BEDROCK:corrupt", "BAD_GATEWAY"),
    ("BEDROCK:truncated", "BAD_GATEWAY"), ("FAIL:reset", "BAD_GATEWAY")])
def test_broken_streams_end_with_error_event(gateway: Server, chat_ep: str, trigger: str,
                                             code: str) -> None:
    with gateway.client() as c, c.stream("POST", f"/serving-endpoints/{chat_ep}/invocations",
                                         json={"messages": [{"role": "user", "content": trigger}],
                                               "stream": True}, timeout=20) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])
    assert err["error_code"] == code, err


@pytest.mark.parametrize("trigger,status,code", [
    ("FAIL:400", 400, "BAD_REQUEST"), ("FAIL:401", 401, "UNAUTHENTICATED"),
    ("FAIL:429", 429, "REQUEST_LIMIT_EXCEEDED"), ("FAIL:500", 502, "BAD_GATEWAY"),
    ("FAIL:timeout", 504, "DEADLINE_EXCEEDED"), ("BEDROCK:modeltimeout", 504,
                                                 "DEADLINE_EXCEEDED")])
def test_errors(gateway: Server, chat_ep: str, trigger: str, status: int, code: str) -> None:
    for stream_ in (False, True):
        with gateway.client() as c:
            r = c.post(f"/serving-endpoints/{chat_ep}/invocations", timeout=20, json={
                "messages": [{"role": "user", "content": trigger}], "stream": stream_})
        assert r.status_code == status and r.json()["error_code"] == code, r.text
        if status == 429:
            assert r.headers["retry-after"] == "2"
            assert "Too many requests" in r.json()["message"]


def test_openai_client_sees_errors(client: OpenAI, chat_ep: str) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=chat_ep,
                                       messages=[{"role": "user", "content": "FAIL:429"}])


@pytest.mark.parametrize("provider,name", [("amazon", "amazon.titan-embed-text-v2:0"),
                                           ("cohere", "cohere.embed-english-v3")])
def test_embeddings_sdk(gateway: Server, fake: FakeServer, provider: str, name: str) -> None:
    ep = f"bedrock-embed-{provider}"
    create_external(gateway, ep, bedrock.external_model(fake.url, "llm/v1/embeddings", name,
                                                        provider))
    ws = WorkspaceClient(host=gateway.url, token=gateway.token)
    r = ws.serving_endpoints.query(name=ep, input=["first text", "second"])
    assert r.data and [d.embedding for d in r.data] == [
        pytest.approx(bedrock.vector("first text")), pytest.approx(bedrock.vector("second"))]
    assert r.usage and r.usage.prompt_tokens == 3
    rec = fake.last()
    assert rec.path == f"/model/{name}/invoke"
    if provider == "cohere":
        assert rec.json() == {"texts": ["first text", "second"], "input_type": "search_document"}
    else:
        assert rec.json() in ({"inputText": "first text"}, {"inputText": "second"})


@pytest.mark.parametrize("change,message", [
    ({"aws_region": None}, "'aws_region' is required"),
    ({"aws_access_key_id_plaintext": None, "aws_secret_access_key_plaintext": None,
      "instance_profile_arn": "arn:aws:iam::1:instance-profile/x"},
     "instance_profile_arn cannot be used by fmserve"),
    ({"bedrock_provider": None}, "'bedrock_provider' is required")])
def test_config_errors(gateway: Server, fake: FakeServer, change: dict[str, Any],
                       message: str) -> None:
    em = bedrock.external_model(fake.url)
    cfg = em["amazon_bedrock_config"]
    for k, v in change.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    with gateway.client() as c:
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": "bedrock-badcfg", "config": {"served_entities": [{"external_model": em}]}})
    assert r.status_code == 400 and message in r.json()["message"], r.text


def test_thinking_needs_anthropic(gateway: Server, fake: FakeServer) -> None:
    create_external(gateway, "bedrock-titan-chat", bedrock.external_model(
        fake.url, name="amazon.titan-text-premier-v1:0", bedrock_provider="amazon"))
    with gateway.client() as c:
        r = c.post("/serving-endpoints/bedrock-titan-chat/invocations", json={
            "messages": [{"role": "user", "content": "q"}], "reasoning_effort": "low"})
    assert r.status_code == 400, r.text


def test_keys_never_leak(gateway: Server, chat_ep: str, client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model=chat_ep,
                                       messages=[{"role": "user", "content": "FAIL:400"}])
    with gateway.client() as c:
        texts = [c.get("/api/2.0/serving-endpoints").text,
                 c.get(f"/api/2.0/serving-endpoints/{chat_ep}").text, gateway.log()]
    for text in texts:
        assert bedrock.SECRET not in text and bedrock.KEY_ID not in text


def test_unknown_field_rejected(gateway: Server, chat_ep: str) -> None:
    r = httpx.post(f"{gateway.url}/serving-endpoints/{chat_ep}/invocations",
                   headers={"Authorization": f"Bearer {gateway.token}"},
                   json={"messages": [{"role": "user", "content": "x"}], "logit_bias": {}})
    assert r.status_code == 400 and "logit_bias" in r.json()["message"]


# -- pure translation (no server) ----------------------------------------------------------
def _req(**kw: Any) -> Any:
    from fmserve.protocol.chat import ChatCompletionRequest
    return ChatCompletionRequest.model_validate(kw)


def test_to_converse_rules() -> None:
    from fmserve.errors import InvalidParameterValue
    from fmserve.providers.bedrock_converse import to_converse
    user = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidParameterValue, match="only supported for bedrock_provider"):
        to_converse(_req(messages=user, reasoning_effort="high"), "cohere")
    history = [*user, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                            "function": {"name": "get_weather",
                                                                         "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    with pytest.raises(InvalidParameterValue, match="tool_choice 'none'"):
        to_converse(_req(messages=history, tools=[WEATHER], tool_choice="none"), "anthropic")
    with pytest.raises(InvalidParameterValue, match="together with tools"):
        to_converse(_req(messages=user, tools=[WEATHER],
                         response_format={"type": "json_object"}), "anthropic")
    body = to_converse(_req(messages=user, thinking={"type": "enabled", "budget_tokens": 1024},
                            top_k=5, extra_params={"additionalModelRequestFields": {"x": 1},
                                                   "guardrailConfig": {"g": 1}}), "anthropic")
    assert body["inferenceConfig"] == {"maxTokens": 1024 + 4096}
    assert body["additionalModelRequestFields"] == {
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "top_k": 5, "x": 1}
    assert body["guardrailConfig"] == {"g": 1}


def test_from_converse_stop_reasons_and_redacted() -> None:
    from fmserve.providers.bedrock_converse import from_converse
    ans, usage = from_converse({"output": {"message": {"content": [
        {"reasoningContent": {"redactedContent": "b64=="}}, {"text": "hi"}]}},
        "stopReason": "guardrail_intervened", "usage": {"inputTokens": 4, "outputTokens": 2}},
        structured=False)
    assert ans.finish_reason == "content_filter" and ans.text == "hi"
    assert ans.message()["content"][0] == {"type": "reasoning", "summary": [
        {"type": "summary_encrypted_text", "data": "b64=="}]}
    assert usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
