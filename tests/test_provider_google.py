"""External models on ``google`` (the Gemini API with an API key), against the fake in
``tests/fakes/google.py``; Vertex AI auth, embeddings and the pure translation functions
are in ``test_provider_google_vertex.py``.

Every test asserts the exact request fmserve sent upstream and drives the gateway with the
real ``openai`` client. The fake rejects replayed function calls that lost their thought
signature, as Gemini 3 does.
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
from fakes import google as fg
from fakes.server import FakeServer
from PIL import Image

MODEL = "gemini-2.5-flash"
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                   "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME: Any = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}
DECL_WEATHER = {"name": "get_weather", "description": "Weather for a city",
                "parametersJsonSchema": {"type": "object",
                                         "properties": {"city": {"type": "string"}},
                                         "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fg.fake() as server:
        yield server


@pytest.fixture(scope="module")
def ep(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "google-chat", fg.external_model(fake.url))
    return "google-chat"


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai_for(gateway)


def sent(fake: FakeServer) -> dict[str, Any]:
    return fake.last().json()  # type: ignore[no-any-return]


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def stream_all(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(stream=True, **kw))


def joined(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks
                   if c.choices and isinstance(c.choices[0].delta.content, str))


def stream_calls(chunks: list[Any]) -> list[dict[str, str]]:
    seen: dict[int, dict[str, str]] = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if d.index not in seen:
                assert d.id and d.function and d.function.name
                seen[d.index] = {"id": d.id, "name": d.function.name, "args": ""}
            seen[d.index]["args"] += (d.function.arguments or "") if d.function else ""
    return list(seen.values())


# -- plain chat (Gemini API) -----------------------------------------------------------------
def test_plain_chat_request_and_answer(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[user("hi")], max_tokens=50,
                                       temperature=0.2, seed=7, stop=["END"])
    rec = fake.last()
    assert rec.path == f"/v1beta/models/{MODEL}:generateContent" and rec.query == {}
    assert rec.headers["x-goog-api-key"] == fg.API_KEY and "authorization" not in rec.headers
    assert rec.json() == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                          "generationConfig": {"maxOutputTokens": 50, "temperature": 0.2,
                                               "stopSequences": ["END"], "seed": 7}}
    assert r.model == ep and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "Echo: hi [system: ] [turns: 1] [images: 0]"
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens > 0


def test_system_prompt_multi_turn_and_n(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, user("a"),
            {"role": "assistant", "content": "b"}, user("c")]
    r = client.chat.completions.create(model=ep, messages=msgs, n=2)  # type: ignore[arg-type]
    assert sent(fake) == {"systemInstruction": {"parts": [{"text": "Be brief."}]}, "contents": [
        {"role": "user", "parts": [{"text": "a"}]}, {"role": "model", "parts": [{"text": "b"}]},
        {"role": "user", "parts": [{"text": "c"}]}]}
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].message.content == "Echo: c [system: Be brief.] [turns: 3] [images: 0]"


def test_extra_params_merged_and_unknown_param_rejected(client: openai.OpenAI, fake: FakeServer,
                                                        ep: str) -> None:
    client.chat.completions.create(model=ep, messages=[user("x")], extra_body={
        "top_k": 5, "extra_params": {
            "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH",
                                "threshold": "BLOCK_NONE"}],
            "generationConfig": {"responseModalities": ["TEXT"]}}})
    assert sent(fake)["safetySettings"][0]["threshold"] == "BLOCK_NONE"
    assert sent(fake)["generationConfig"] == {"topK": 5, "responseModalities": ["TEXT"]}
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=ep, messages=[user("x")], logit_bias={"1": 2})


def test_stream_plain(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    chunks = stream_all(client, model=ep, messages=[user("hello")])
    rec = fake.last()
    assert rec.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert rec.query == {"alt": "sse"} and rec.headers["x-goog-api-key"] == fg.API_KEY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert joined(chunks) == "Echo: hello [system: ] [turns: 1] [images: 0]"
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens > 0


# -- tools -----------------------------------------------------------------------------------
@pytest.mark.parametrize("choice,config,names", [
    (None, None, ["get_weather"]),
    ("auto", {"mode": "AUTO"}, ["get_weather"]),
    ("required", {"mode": "ANY"}, ["get_weather"]),
    ({"type": "function", "function": {"name": "get_time"}},
     {"mode": "ANY", "allowedFunctionNames": ["get_time"]}, ["get_time"])])
def test_tools(client: openai.OpenAI, fake: FakeServer, ep: str, choice: Any, config: Any,
               names: list[str]) -> None:
    kw: dict[str, Any] = {"tool_choice": choice} if choice else {}
    r = client.chat.completions.create(model=ep, messages=[user("weather in Paris?")],
                                       tools=[WEATHER, TIME], **kw)  # type: ignore[list-item]
    body = sent(fake)
    assert body["tools"] == [{"functionDeclarations": [DECL_WEATHER, {
        "name": "get_time", "description": "Local time",
        "parametersJsonSchema": TIME["function"]["parameters"]}]}]  # type: ignore[index]
    assert body.get("toolConfig") == ({"functionCallingConfig": config} if config else None)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert [t.function.name for t in c.message.tool_calls or []] == names
    assert all(t.id.startswith("call_") for t in c.message.tool_calls or [])


def test_tool_choice_none(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[user("weather?")], tools=[WEATHER],
                                       tool_choice="none")  # type: ignore[list-item]
    assert sent(fake)["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


def test_parallel_tools_and_stream(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    msgs = [user("parallel weather and time")]
    r = client.chat.completions.create(model=ep, messages=msgs, tools=[WEATHER, TIME],
                                       parallel_tool_calls=True)  # type: ignore[list-item]
    calls: Any = r.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Paris"})]
    assert len({c.id for c in calls}) == 2
    chunks = stream_all(client, model=ep, messages=msgs, tools=[WEATHER, TIME])
    got = stream_calls(chunks)
    assert [(g["name"], json.loads(g["args"])) for g in got] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_turn(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    msgs = [user("weather?"),
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": '{"time": "12:00"}'}]
    r = client.chat.completions.create(model=ep, messages=msgs,  # type: ignore[arg-type]
                                       tools=[WEATHER, TIME])  # type: ignore[list-item]
    assert sent(fake)["contents"] == [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}},
            {"functionResponse": {"name": "get_time", "response": {"time": "12:00"}}}]}]
    assert r.choices[0].message.content == 'Tool said: {"time": "12:00"}'
    n = len(fake.requests)
    with pytest.raises(openai.BadRequestError, match="matches no tool call"):
        client.chat.completions.create(model=ep, messages=[
            user("x"), {"role": "tool", "tool_call_id": "nope", "content": "y"}])
    assert len(fake.requests) == n


# -- thinking and thought signatures ---------------------------------------------------------
def test_thinking_reasoning_and_signature_sent_back(client: openai.OpenAI, fake: FakeServer,
                                                    ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[user("why")], max_tokens=4096,
                                       extra_body={"thinking": {"type": "enabled",
                                                                "budget_tokens": 2048}})
    assert sent(fake)["generationConfig"] == {
        "maxOutputTokens": 4096, "thinkingConfig": {"thinkingBudget": 2048,
                                                    "includeThoughts": True}}
    msg: Any = r.choices[0].message.model_dump(exclude_none=True, warnings=False)
    [thought, text_sig, text] = msg["content"]
    assert thought["summary"][0]["text"] == "Thinking about: why"
    sig = text_sig["summary"][0]["signature"]
    assert sig.startswith("sig-") and text_sig["summary"][0]["text"] == ""
    assert text == {"type": "text", "text": "Echo: why [system: ] [turns: 1] [images: 0]"}
    assert r.usage is not None and r.usage.model_dump()["reasoning_tokens"] > 0
    client.chat.completions.create(model=ep, messages=[user("why"), msg, user("and?")])
    assert sent(fake)["contents"][1] == {"role": "model", "parts": [
        {"text": "Thinking about: why", "thought": True},
        {"text": "Echo: why [system: ] [turns: 1] [images: 0]", "thoughtSignature": sig}]}
    # reasoning_effort maps to a budget too
    client.chat.completions.create(model=ep, messages=[user("q")], reasoning_effort="low")
    assert sent(fake)["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 1024


def _tool_turn(first: Any, result: str = "sunny") -> list[Any]:
    msg = (first.model_dump(exclude_none=True, warnings=False) if hasattr(first, "model_dump")
           else first)
    return [user("weather in Oslo?"), msg] + [
        {"role": "tool", "tool_call_id": c["id"], "content": result} for c in msg["tool_calls"]]


def test_thought_signature_survives_tool_round_trip(client: openai.OpenAI, fake: FakeServer,
                                                    ep: str) -> None:
    think = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    r = client.chat.completions.create(model=ep, messages=[user("weather in Oslo?")],
                                       tools=[WEATHER], max_tokens=2000,  # type: ignore[list-item]
                                       extra_body=think)
    issued = fake.last()
    first = r.choices[0].message
    assert first.tool_calls and r.choices[0].finish_reason == "tool_calls"
    # 1. the message replayed as returned
    r2 = client.chat.completions.create(model=ep, messages=_tool_turn(first), tools=[WEATHER],
                                        max_tokens=2000, extra_body=think)
    model_turn = sent(fake)["contents"][1]
    call_part = [p for p in model_turn["parts"] if "functionCall" in p][0]
    assert call_part["thoughtSignature"].startswith("sig-")
    assert r2.choices[0].message.content is not None
    assert "Tool said: sunny" in json.dumps(r2.choices[0].message.model_dump(warnings=False))
    # 2. a client that keeps only role + tool_calls (reasoning content dropped)
    bare: Any = {"role": "assistant", "tool_calls": [t.model_dump() for t in first.tool_calls]}
    client.chat.completions.create(model=ep, messages=_tool_turn(bare), tools=[WEATHER])
    assert sent(fake)["contents"][1]["parts"][0]["thoughtSignature"] == \
        call_part["thoughtSignature"]
    # 3. control: a call id rewritten by the client loses the signature → Gemini's 400
    lost: Any = {"role": "assistant", "tool_calls": [{**bare["tool_calls"][0], "id": "call_x"}]}
    with pytest.raises(openai.BadRequestError, match="missing a thought_signature"):
        client.chat.completions.create(model=ep, messages=_tool_turn(lost), tools=[WEATHER])
    assert issued.json()["generationConfig"]["thinkingConfig"]["includeThoughts"] is True


def test_thought_signature_stream_round_trip_parallel(client: openai.OpenAI, fake: FakeServer,
                                                      ep: str) -> None:
    msgs = [user("parallel weather please")]
    chunks = stream_all(client, model=ep, messages=msgs, tools=[WEATHER, TIME],
                        reasoning_effort="low")
    reasoning = [c.choices[0].delta.content for c in chunks
                 if c.choices and isinstance(c.choices[0].delta.content, list)]
    assert reasoning and reasoning[0][0]["summary"][0]["text"].startswith("Thinking about")
    calls = stream_calls(chunks)
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assistant = {"role": "assistant", "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"],
                                                         "arguments": c["args"]}}
        for c in calls]}
    history = msgs + [assistant] + [{"role": "tool", "tool_call_id": c["id"], "content": "ok"}
                                    for c in calls]
    r = client.chat.completions.create(model=ep, messages=history,  # type: ignore[arg-type]
                                       tools=[WEATHER, TIME])  # type: ignore[list-item]
    parts = sent(fake)["contents"][1]["parts"]
    assert "thoughtSignature" in parts[0] and "thoughtSignature" not in parts[1]
    assert r.choices[0].message.content == "Tool said: ok"


# -- images, structured output ---------------------------------------------------------------
def test_image_inline_data(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    r = client.chat.completions.create(model=ep, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]}])
    assert sent(fake)["contents"] == [{"role": "user", "parts": [
        {"text": "what?"}, {"inlineData": {"mimeType": "image/png", "data": b64}}]}]
    assert r.choices[0].message.content == "Echo: what? [system: ] [turns: 1] [images: 1]"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
RF: Any = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}


def test_json_schema(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[user("p")],
                                       response_format=RF)  # type: ignore[arg-type]
    assert sent(fake)["generationConfig"] == {"responseMimeType": "application/json",
                                              "responseJsonSchema": SCHEMA}
    assert json.loads(r.choices[0].message.content or "") == {"name": "Paris", "age": 3}
    chunks = stream_all(client, model=ep, messages=[user("p")], response_format=RF)
    assert json.loads(joined(chunks)) == {"name": "Paris", "age": 3}
    r = client.chat.completions.create(model=ep, messages=[user("p")],
                                       response_format={"type": "json_object"})
    assert sent(fake)["generationConfig"] == {"responseMimeType": "application/json"}
    assert json.loads(r.choices[0].message.content or "") == {"answer": "Paris"}


# -- errors ----------------------------------------------------------------------------------
def stream_lines(http: httpx.Client, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", "/serving-endpoints/chat/completions",
                     json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [ln for ln in r.iter_lines() if ln]


@pytest.mark.parametrize("fail,status,needle", [
    ("400", 400, "Injected failure 400"), ("401", 401, "Injected failure 401"),
    ("429", 429, "Resource has been exhausted"), ("500", 502, "HTTP 500"),
    ("timeout", 504, "did not answer")])
def test_errors(gateway: Server, ep: str, fail: str, status: int, needle: str) -> None:
    with gateway.client() as http:
        r = http.post("/serving-endpoints/chat/completions", json={
            "model": ep, "messages": [user(f"FAIL:{fail}")]})
    assert r.status_code == status, r.text
    assert needle in r.json()["message"]
    if fail == "429":
        assert r.headers["Retry-After"] == "7"


def test_openai_client_error_classes_and_stream_reset(client: openai.OpenAI, gateway: Server,
                                                      ep: str) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=ep, messages=[user("FAIL:429")])
    with pytest.raises(openai.AuthenticationError):
        stream_all(client, model=ep, messages=[user("FAIL:401")])
    with gateway.client() as http:
        lines = stream_lines(http, {"model": ep, "messages": [user("hi FAIL:reset")]})
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])
    assert err["error_code"] == "BAD_GATEWAY" and "broke" in err["message"], err
