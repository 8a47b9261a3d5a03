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
from conftest import Server, create_external, openai_for
from fakes import openai as fake_openai
from fakes.server import FakeServer

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
    return openai_for(gateway)


def sent(fake: FakeServer) -> dict[str, Any]:
    return fake.last().json()  # type: ignore[no-any-return]


def stream_all(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(stream=True, **kw))


def joined(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- plain chat ------------------------------------------------------------------------------
def test_upstream_connections_are_kept_alive(client: openai.OpenAI, fake: FakeServer,
                                             ep: str) -> None:
    """Sequential requests, answers and streams, reuse one upstream connection (no
    connection per request, nothing left in TIME_WAIT)."""
    start = len(fake.requests)
    hi = [{"role": "user", "content": "hi"}]
    for i in range(12):
        if i % 3:
            client.chat.completions.create(model=ep, messages=hi, max_tokens=5)
        else:
            stream_all(client, model=ep, messages=hi, max_tokens=5)
    ports = {r.peer_port for r in fake.requests[start:]}
    # A stream's connection goes back to the pool as its generator ends, which can be
    # just after the client read [DONE]: the next request may open a second one.
    assert len(fake.requests) - start == 12 and len(ports) <= 2, ports


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


# -- tools -----------------------------------------------------------------------------------
@pytest.mark.parametrize("choice,names", [
    (None, ["get_weather"]), ("required", ["get_weather"]),
    ({"type": "function", "function": {"name": "get_time"}}, ["get_time"])])
def test_tools(client: openai.OpenAI, fake: FakeServer, ep: str, choice: Any,
               names: list[str]) -> None:
    kw: dict[str, Any] = {"tool_choice": choice} if choice else {}
    r = client.chat.completions.create(
        model=ep, messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER, TIME], **kw)  # type: ignore[list-item]
    body = sent(fake)
    assert body["tools"] == [WEATHER, TIME]
    assert body.get("tool_choice") == choice
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert [t.function.name for t in c.message.tool_calls or []] == names


def test_parallel_tools_and_stream(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    msgs = [{"role": "user", "content": "parallel weather and time"}]
    r = client.chat.completions.create(model=ep, messages=msgs, tools=[WEATHER, TIME],
                                       parallel_tool_calls=True)  # type: ignore[list-item]
    assert sent(fake)["parallel_tool_calls"] is True
    calls = r.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    chunks = stream_all(client, model=ep, messages=msgs, tools=[WEATHER, TIME])
    seen: dict[int, dict[str, str]] = {}
    for ch in chunks:
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if d.index not in seen:
                assert d.id and d.function and d.function.name  # id + name on the first delta
                seen[d.index] = {"id": d.id, "name": d.function.name, "args": ""}
            else:
                assert d.id is None
            assert (d.function.arguments if d.function else "") != "{}"
            seen[d.index]["args"] += (d.function.arguments or "") if d.function else ""
    assert [(s["id"], s["name"]) for s in seen.values()] == [(c.id, c.function.name)
                                                             for c in calls]
    assert [json.loads(s["args"]) for s in seen.values()] == [{"city": "Paris"}, {"tz": "Paris"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_turn(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=ep, messages=msgs,  # type: ignore[arg-type]
                                       tools=[WEATHER])  # type: ignore[list-item]
    assert sent(fake)["messages"] == msgs
    assert r.choices[0].message.content == "Tool said: sunny"


def test_bad_tool_is_400_before_provider(client: openai.OpenAI, fake: FakeServer,
                                         ep: str) -> None:
    n = len(fake.requests)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(
            model=ep, messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert len(fake.requests) == n


# -- reasoning, structured output ----------------------------------------------------------
def test_reasoning_effort_and_thinking_mapped(client: openai.OpenAI, fake: FakeServer,
                                              ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[{"role": "user", "content": "why"}],
                                       reasoning_effort="high")
    assert sent(fake)["reasoning_effort"] == "high"
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.model_dump()["reasoning_tokens"] > 0
    # Anthropic-style thinking becomes reasoning_effort; prior reasoning blocks (which
    # OpenAI never returns and cannot take back) are dropped from assistant history.
    prior = {"role": "assistant", "content": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t",
                                           "signature": "sig"}]},
        {"type": "text", "text": "earlier"}]}
    client.chat.completions.create(
        model=ep, messages=[{"role": "user", "content": "a"}, prior,  # type: ignore[list-item]
                            {"role": "user", "content": "b"}], max_tokens=4096,
        extra_body={"thinking": {"type": "enabled", "budget_tokens": 2048}})
    body = sent(fake)
    assert "thinking" not in body and body["reasoning_effort"] == "medium"
    assert body["messages"][1] == {"role": "assistant",
                                   "content": [{"type": "text", "text": "earlier"}]}


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}


def test_json_schema(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    r = client.chat.completions.create(model=ep, messages=[{"role": "user", "content": "p"}],
                                       response_format=RF)  # type: ignore[arg-type]
    assert sent(fake)["response_format"] == RF
    assert json.loads(r.choices[0].message.content or "") == {"name": "Paris", "age": 3}
    chunks = stream_all(client, model=ep, messages=[{"role": "user", "content": "p"}],
                        response_format=RF)
    assert json.loads(joined(chunks)) == {"name": "Paris", "age": 3}


def test_json_schema_violation_is_502(client: openai.OpenAI, gateway: Server, ep: str) -> None:
    with gateway.client() as http:
        r = http.post("/serving-endpoints/chat/completions", json={
            "model": ep, "messages": [{"role": "user", "content": "FAIL:badjson"}],
            "response_format": RF})
        assert r.status_code == 502 and "not valid JSON" in r.json()["message"]
        events = stream_lines(http, {"model": ep, "response_format": RF, "messages": [
            {"role": "user", "content": "FAIL:badjson"}]})
        assert events[-1] == "data: [DONE]" and "not valid JSON" in events[-2]


def stream_lines(http: httpx.Client, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", "/serving-endpoints/chat/completions",
                     json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [ln for ln in r.iter_lines() if ln]


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("fail,status", [("400", 400), ("401", 401), ("429", 429),
                                         ("500", 502), ("timeout", 504)])
def test_errors(gateway: Server, ep: str, fail: str, status: int) -> None:
    with gateway.client() as http:
        r = http.post("/serving-endpoints/chat/completions", json={
            "model": ep, "messages": [{"role": "user", "content": f"FAIL:{fail}"}]})
    assert r.status_code == status, r.text
    if fail == "429":
        assert r.headers["Retry-After"] == "7"
        assert "Rate limit reached" in r.json()["message"]
    if fail == "401":
        assert "Incorrect API key" in r.json()["message"]


def test_openai_client_error_classes(client: openai.OpenAI, ep: str) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=ep, messages=[{"role": "user", "content": "FAIL:429"}])
    with pytest.raises(openai.AuthenticationError):
        stream_all(client, model=ep, messages=[{"role": "user", "content": "FAIL:401"}])


@pytest.mark.parametrize("fail,needle", [("reset", "broke"), ("midstream", "server had an error"),
                                         ("nodone", "without 'data: [DONE]'")])
def test_stream_breaks_end_with_error_event(gateway: Server, ep: str, fail: str,
                                            needle: str) -> None:
    with gateway.client() as http:
        lines = stream_lines(http, {"model": ep, "messages": [
            {"role": "user", "content": f"hi FAIL:{fail}"}]})
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])
    assert err["error_code"] == "BAD_GATEWAY" and needle in err["message"], err


# -- Azure OpenAI ----------------------------------------------------------------------------
def azure(fake: FakeServer, **cfg: Any) -> dict[str, Any]:
    return {"provider": "openai", "name": "gpt-4o", "task": "llm/v1/chat", "openai_config": {
        "openai_api_base": fake.url, "openai_deployment_name": "my-gpt4o",
        "openai_api_version": "2024-10-21", **cfg}}


def test_azure_api_key(gateway: Server, client: openai.OpenAI, fake: FakeServer) -> None:
    create_external(gateway, "openai-azure", azure(fake, openai_api_type="azure",
                                                    openai_api_key_plaintext="azure-key-12345"))
    r = client.chat.completions.create(model="openai-azure",
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.startswith("Echo: hi")  # type: ignore[union-attr]
    rec = fake.last()
    assert rec.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert rec.query == {"api-version": "2024-10-21"}
    assert rec.headers["api-key"] == "azure-key-12345" and "authorization" not in rec.headers
    assert joined(stream_all(client, model="openai-azure",
                             messages=[{"role": "user", "content": "s"}])).startswith("Echo: s")


def test_azuread_entra_token_fetched_once(gateway: Server, client: openai.OpenAI,
                                          fake: FakeServer) -> None:
    create_external(gateway, "openai-azuread", azure(
        fake, openai_api_type="azuread", microsoft_entra_client_id="app-id",
        microsoft_entra_client_secret_plaintext="entra-secret-xyz",
        microsoft_entra_tenant_id="tenant-1", microsoft_entra_authority_host=fake.url))
    before = len([r for r in fake.requests if r.path.endswith("/token")])
    for _ in range(3):
        client.chat.completions.create(model="openai-azuread",
                                       messages=[{"role": "user", "content": "hi"}])
        assert fake.last().headers["authorization"].startswith("Bearer entra-token-")
    tokens = [r for r in fake.requests if r.path.endswith("/token")]
    assert len(tokens) == before + 1
    tok = tokens[-1]
    assert tok.path == "/tenant-1/oauth2/v2.0/token"
    form = dict(x.split("=", 1) for x in tok.body.decode().split("&"))
    assert form["grant_type"] == "client_credentials" and form["client_id"] == "app-id"
    assert form["client_secret"] == "entra-secret-xyz"
    assert form["scope"] == "https%3A%2F%2Fcognitiveservices.azure.com%2F.default"
    assert fake.last().path == "/openai/deployments/my-gpt4o/chat/completions"


def test_bad_configs_are_400(gateway: Server, fake: FakeServer) -> None:
    bad = [azure(fake, openai_api_type="azure"),  # no key
           azure(fake, openai_api_type="bogus", openai_api_key_plaintext="k"),
           {**azure(fake), "openai_config": {"openai_api_type": "azure",
                                             "openai_api_key_plaintext": "k"}},
           {"provider": "custom", "name": "m", "task": "llm/v1/chat",
            "custom_provider_config": {"custom_provider_url": "ftp://x"}},
           {"provider": "custom", "name": "m", "task": "llm/v1/chat",
            "custom_provider_config": {"custom_provider_url": "http://x", "api_key_auth": {
                "key": "x-api-key", "value_plaintext": "a"}, "bearer_token_auth": {
                "token_plaintext": "b"}}},
           {"provider": "databricks-model-serving", "name": "m", "task": "llm/v1/chat",
            "databricks_model_serving_config": {"databricks_workspace_url": "http://x"}}]
    with gateway.client() as http:
        for model in bad:
            r = http.post("/api/2.0/serving-endpoints", json={
                "name": "openai-bad", "config": {"served_entities": [{"external_model": model}]}})
            assert r.status_code == 400, (model, r.text)
            assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"


# -- custom ----------------------------------------------------------------------------------
def test_custom_api_key_auth(gateway: Server, client: openai.OpenAI, fake: FakeServer) -> None:
    create_external(gateway, "openai-custom-key", {
        "provider": "custom", "name": "llama-3-8b", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": fake.url + "/v1/", "api_key_auth": {
            "key": "X-Api-Key", "value_plaintext": "custom-key-abcdef"}}})
    client.chat.completions.create(model="openai-custom-key", top_p=0.5,
                                   messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"top_k": 40})
    rec = fake.last()
    assert rec.path == "/v1/chat/completions" and rec.headers["x-api-key"] == "custom-key-abcdef"
    assert "authorization" not in rec.headers
    assert rec.json() == {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],
                          "top_p": 0.5, "top_k": 40}


def test_custom_bearer_and_reasoning_content(gateway: Server, client: openai.OpenAI,
                                             fake: FakeServer) -> None:
    create_external(gateway, "openai-custom-bearer", {
        "provider": "custom", "name": "deepseek-r1", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": fake.url + "/vllm/v1",
                                   "bearer_token_auth": {"token_plaintext": "bearer-tok-123"}}})
    msgs = [{"role": "user", "content": "why"}]
    r = client.chat.completions.create(model="openai-custom-bearer", messages=msgs,
                                       reasoning_effort="low")
    assert fake.last().headers["authorization"] == "Bearer bearer-tok-123"
    assert sent(fake)["reasoning_effort"] == "low"  # passed as the client sent it
    content = r.choices[0].message.content
    assert content[0] == {"type": "reasoning", "summary": [
        {"type": "summary_text", "text": "Thinking about: why"}]}
    assert content[1]["text"].startswith("Echo: why")
    chunks = stream_all(client, model="openai-custom-bearer", messages=msgs,
                        reasoning_effort="low")
    blocks = [c.choices[0].delta.content for c in chunks if c.choices]
    assert [{"type": "reasoning", "summary": [{"type": "summary_text",
                                               "text": "Thinking about: why"}]}] in blocks


# -- databricks-model-serving ----------------------------------------------------------------
@pytest.fixture(scope="module")
def dbx(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "openai-dbx", {
        "provider": "databricks-model-serving", "name": "databricks-claude-sonnet",
        "task": "llm/v1/chat", "databricks_model_serving_config": {
            "databricks_workspace_url": fake.url,
            "databricks_api_token_plaintext": "dapi-remote-1"}})
    return "openai-dbx"


def test_databricks_thinking_round_trip(client: openai.OpenAI, fake: FakeServer,
                                        dbx: str) -> None:
    think = {"type": "enabled", "budget_tokens": 1024}
    r = client.chat.completions.create(model=dbx, messages=[{"role": "user", "content": "why"}],
                                       max_tokens=2048, extra_body={"thinking": think})
    rec = fake.last()
    assert rec.path == "/serving-endpoints/chat/completions"
    assert rec.headers["authorization"] == "Bearer dapi-remote-1"
    assert rec.json()["model"] == "databricks-claude-sonnet" and rec.json()["thinking"] == think
    msg = r.choices[0].message.model_dump(warnings=False)
    reasoning = msg["content"][0]
    assert reasoning["summary"][0]["signature"].startswith("sig-")
    # the prior reasoning block (signature included) goes back to the provider intact
    history = [{"role": "user", "content": "why"},
               {"role": "assistant", "content": msg["content"]},
               {"role": "user", "content": "and?"}]
    client.chat.completions.create(model=dbx, messages=history,  # type: ignore[arg-type]
                                   max_tokens=2048, extra_body={"thinking": think})
    assert sent(fake)["messages"][1] == {"role": "assistant", "content": msg["content"]}
    chunks = stream_all(client, model=dbx, messages=[{"role": "user", "content": "why"}],
                        max_tokens=2048, extra_body={"thinking": think})
    assert "stream_options" not in sent(fake)
    assert chunks[0].choices[0].delta.role == "assistant"
    first = [c.choices[0].delta.content for c in chunks
             if isinstance(c.choices[0].delta.content, list)]
    assert first[0][0]["summary"][0]["signature"] == reasoning["summary"][0]["signature"]
    usage = [c.usage.completion_tokens for c in chunks if c.usage]
    assert len(usage) == len(chunks) and usage == sorted(usage)


def test_databricks_mlflow_predict(monkeypatch: pytest.MonkeyPatch, gateway: Server,
                                   fake: FakeServer, dbx: str) -> None:
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("DATABRICKS_HOST", gateway.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", gateway.token)
    out = get_deploy_client("databricks").predict(endpoint=dbx, inputs={
        "messages": [{"role": "user", "content": "mlflow"}], "max_tokens": 20})
    assert out["choices"][0]["message"]["content"].startswith("Echo: mlflow")
    assert sent(fake)["max_tokens"] == 20


def test_databricks_errors(gateway: Server, dbx: str) -> None:
    with gateway.client() as http:
        r = http.post("/serving-endpoints/chat/completions", json={
            "model": dbx, "messages": [{"role": "user", "content": "FAIL:429"}]})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert "Rate limit reached" in r.json()["message"]


# -- embeddings, completions -------------------------------------------------------------------
@pytest.fixture(scope="module")
def emb(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "openai-emb", fake_openai.external_model(
        fake.url, task="llm/v1/embeddings", name="text-embedding-3-small"))
    return "openai-emb"


def test_embeddings_openai_client_base64(client: openai.OpenAI, fake: FakeServer,
                                         emb: str) -> None:
    r = client.embeddings.create(model=emb, input=["a", "bb"])  # base64 by default
    assert sent(fake) == {"model": "text-embedding-3-small", "input": ["a", "bb"],
                          "encoding_format": "base64"}
    assert fake.last().path == "/v1/embeddings"
    for d, text in zip(r.data, ["a", "bb"], strict=True):
        assert d.embedding == pytest.approx(fake_openai.vector(text), abs=1e-6)
    assert r.usage.prompt_tokens == 2
    r = client.embeddings.create(model=emb, input="a", encoding_format="float", dimensions=8)
    assert sent(fake) == {"model": "text-embedding-3-small", "input": "a",
                          "encoding_format": "float", "dimensions": 8}
    assert r.data[0].embedding == pytest.approx(fake_openai.vector("a"), abs=1e-6)


def test_embeddings_databricks_sdk(gateway: Server, fake: FakeServer, emb: str) -> None:
    from databricks.sdk import WorkspaceClient

    w = WorkspaceClient(host=gateway.url, token=gateway.token)
    r = w.serving_endpoints.query(emb, input=["hello", "world"])
    assert sent(fake)["input"] == ["hello", "world"]
    assert [d.embedding for d in r.data or []] == [
        pytest.approx(fake_openai.vector(t), abs=1e-6) for t in ("hello", "world")]


def test_embeddings_via_databricks_provider(gateway: Server, client: openai.OpenAI,
                                            fake: FakeServer) -> None:
    create_external(gateway, "openai-dbx-emb", {
        "provider": "databricks-model-serving", "name": "databricks-gte-large-en",
        "task": "llm/v1/embeddings", "databricks_model_serving_config": {
            "databricks_workspace_url": fake.url, "databricks_api_token_plaintext": "dapi-2"}})
    r = client.embeddings.create(model="openai-dbx-emb", input=["x"])
    assert fake.last().path == "/serving-endpoints/embeddings"
    assert sent(fake) == {"model": "databricks-gte-large-en", "input": ["x"]}
    assert r.data[0].embedding == pytest.approx(fake_openai.vector("x"), abs=1e-6)


def test_native_completions(gateway: Server, client: openai.OpenAI, fake: FakeServer) -> None:
    create_external(gateway, "openai-cmpl", fake_openai.external_model(
        fake.url, task="llm/v1/completions", name="gpt-3.5-turbo-instruct"))
    r = client.completions.create(model="openai-cmpl", prompt="once", max_tokens=30)
    assert fake.last().path == "/v1/completions"
    assert sent(fake) == {"model": "gpt-3.5-turbo-instruct", "prompt": "once", "max_tokens": 30}
    assert r.choices[0].text.startswith("Echo: once") and r.model == "openai-cmpl"
    chunks = list(client.completions.create(model="openai-cmpl", prompt="twice", stream=True))
    assert sent(fake)["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("Echo: twice")
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_completions_on_chat_model_go_through_chat(client: openai.OpenAI, fake: FakeServer,
                                                   ep: str) -> None:
    r = client.completions.create(model=ep, prompt="p1")
    assert fake.last().path == "/v1/chat/completions"
    assert r.choices[0].text.startswith("Echo: p1")


# -- images, secrets -----------------------------------------------------------------------------
def test_images_sent_as_data_urls(client: openai.OpenAI, fake: FakeServer, ep: str) -> None:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (0, 90, 200)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.chat.completions.create(model=ep, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what"},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])
    parts = sent(fake)["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "what"}
    assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["detail"] == "low"
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "[images: 1]" in (r.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=ep, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_keys_never_shown(gateway: Server, ep: str, dbx: str) -> None:
    secrets = [KEY, "azure-key-12345", "entra-secret-xyz", "custom-key-abcdef",
               "bearer-tok-123", "dapi-remote-1"]
    with gateway.client() as http:
        texts = [http.get("/api/2.0/serving-endpoints").text]
        texts += [http.get(f"/api/2.0/serving-endpoints/{n}").text for n in (ep, dbx)]
    texts.append(gateway.log())
    for text in texts:
        for s in secrets:
            assert s not in text


def test_tool_delta_placeholder_and_ids() -> None:
    from fmserve.providers.openai_stream import _Stream

    st = _Stream(False)
    first = st.tool_deltas(0, [{"index": 0, "id": "c1", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}])
    assert first == [{"index": 0, "id": "c1", "type": "function",
                      "function": {"name": "f", "arguments": ""}}]
    assert st.tool_deltas(0, [{"index": 0, "function": {"arguments": '{"a": 1}'}}]) == [
        {"index": 0, "function": {"arguments": '{"a": 1}'}}]
    assert st.flush_args(0) == []  # real arguments followed: the placeholder is dropped
    st.tool_deltas(0, [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}])
    assert st.flush_args(0) == [{"index": 1, "function": {"arguments": "{}"}}]
    # a server that omits index/id still gets a stable index and a generated id
    out = st.tool_deltas(1, [{"function": {"name": "h", "arguments": ""}}])
    assert out[0]["index"] == 0 and out[0]["id"].startswith("call_")
