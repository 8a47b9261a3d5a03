"""Raw HTTP against a real ``fmserve serve``: auth, host metadata, the native
``/invocations`` contract and its error answers (spec §3, §6, §8, §11, §12).

Every bad input must answer with the Databricks error body
``{"error_code", "message"}`` and a 4xx status, never a 500.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from conftest import CHAT, EMBED, Server

INVOKE_CHAT = f"/serving-endpoints/{CHAT}/invocations"
INVOKE_EMBED = f"/serving-endpoints/{EMBED}/invocations"
HI = [{"role": "user", "content": "Hi"}]


def _error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> str:
    """Asserts a Databricks error answer; returns its message."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body.get("error_code"), str) and body["error_code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if code is not None:
        assert body["error_code"] == code, body
    return str(body["message"])


def _chat(http: httpx.Client, content: str, **kw: Any) -> dict[str, Any]:
    r = http.post(INVOKE_CHAT, json={"messages": [{"role": "user", "content": content}], **kw})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# -- authentication ----------------------------------------------------------------


def test_basic_auth_token_password(server: Server) -> None:
    body = {"messages": HI, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=120, auth=("token", server.token)) as c:
        r = c.post(INVOKE_CHAT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert c.get("/api/2.0/serving-endpoints").status_code == 200
    with httpx.Client(base_url=server.url, timeout=30, auth=("token", "dapi-wrong")) as c:
        _error(c.post(INVOKE_CHAT, json=body), 401, "UNAUTHENTICATED")
        _error(c.get("/api/2.0/serving-endpoints"), 401, "UNAUTHENTICATED")


@pytest.mark.parametrize("header", [None, "Bearer dapi-not-a-token", "Bearer", "Token abc",
                                    "Basic !!!not-base64!!!"])
def test_bad_credentials_are_401(server: Server, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = httpx.post(server.url + INVOKE_CHAT, json={"messages": HI}, headers=headers, timeout=30)
    msg = _error(r, 401, "UNAUTHENTICATED")
    assert "token" in msg.lower()
    r = httpx.get(server.url + "/api/2.0/serving-endpoints", headers=headers, timeout=30)
    _error(r, 401, "UNAUTHENTICATED")


def test_well_known_config_without_auth(server: Server) -> None:
    r = httpx.get(server.url + "/.well-known/databricks-config", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert str(body["workspace_id"]).strip()
    assert body["oidc_endpoint"].startswith(server.url)
    assert body["oidc_endpoint"].rstrip("/").endswith("/oidc")


def test_health_without_auth(server: Server) -> None:
    r = httpx.get(server.url + "/health", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["endpoints"] == {CHAT: "READY", EMBED: "READY"}
    assert {w["entity"] for w in body["workers"]} == {CHAT, EMBED}


# -- endpoint management -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/2.0/serving-endpoints", "/api/2.0/serving-endpoints/"])
def test_list_endpoints_with_and_without_trailing_slash(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"endpoints"}
    tasks = {ep["name"]: ep["task"] for ep in body["endpoints"]}
    assert tasks[CHAT] == "llm/v1/chat"
    assert tasks[EMBED] == "llm/v1/embeddings"


def test_get_unknown_endpoint_is_404(http: httpx.Client) -> None:
    msg = _error(http.get("/api/2.0/serving-endpoints/nope"), 404, "RESOURCE_DOES_NOT_EXIST")
    assert "nope" in msg


# -- bad inputs --------------------------------------------------------------------------


def test_unknown_endpoint_is_404(http: httpx.Client) -> None:
    r = http.post("/serving-endpoints/no-such-endpoint/invocations", json={"messages": HI})
    msg = _error(r, 404, "RESOURCE_DOES_NOT_EXIST")
    assert "no-such-endpoint" in msg


def test_unknown_route_is_404_json(http: httpx.Client) -> None:
    _error(http.get("/api/2.0/no-such-api"), 404)


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"messages": [', b"\xff\xfe"])
def test_malformed_json_is_400(http: httpx.Client, raw: bytes) -> None:
    r = http.post(INVOKE_CHAT, content=raw, headers={"Content-Type": "application/json"})
    _error(r, 400)


@pytest.mark.parametrize("raw", [b"[]", b'[{"messages": []}]', b'"hello"', b"42", b"null"])
def test_non_object_body_is_400(http: httpx.Client, raw: bytes) -> None:
    r = http.post(INVOKE_CHAT, content=raw, headers={"Content-Type": "application/json"})
    msg = _error(r, 400)
    assert "object" in msg.lower()


@pytest.mark.parametrize(("extra", "field"), [
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": "x"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": "two"}, "n"),
    ({"stream": "maybe"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
])
def test_wrong_types_are_400_naming_the_field(http: httpx.Client, extra: dict[str, Any],
                                              field: str) -> None:
    r = http.post(INVOKE_CHAT, json={"messages": HI, **extra})
    msg = _error(r, 400)
    assert f"'{field}'" in msg, msg


@pytest.mark.parametrize(("messages", "field"), [
    ("hi", "messages"),
    ({"role": "user", "content": "hi"}, "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
])
def test_bad_messages_are_400_naming_the_field(http: httpx.Client, messages: Any,
                                               field: str) -> None:
    msg = _error(http.post(INVOKE_CHAT, json={"messages": messages}), 400)
    assert f"'{field}'" in msg, msg


def test_empty_messages_is_400(http: httpx.Client) -> None:
    msg = _error(http.post(INVOKE_CHAT, json={"messages": []}), 400)
    assert "'messages'" in msg


@pytest.mark.parametrize("n", [0, 6, -1])
def test_n_out_of_range_is_400(http: httpx.Client, n: int) -> None:
    msg = _error(http.post(INVOKE_CHAT, json={"messages": HI, "n": n}), 400)
    assert "'n'" in msg


def test_stop_null_is_400(http: httpx.Client) -> None:
    r = http.post(INVOKE_CHAT, json={"messages": HI, "stop": None, "max_tokens": 4})
    msg = _error(r, 400, "INVALID_PARAMETER_VALUE")
    assert "stop" in msg and "null" in msg


def test_chat_body_to_embeddings_endpoint_is_400(http: httpx.Client) -> None:
    msg = _error(http.post(INVOKE_EMBED, json={"messages": HI}), 400)
    assert "llm/v1/embeddings" in msg or "embeddings" in msg
    _error(http.post(INVOKE_EMBED, json={"prompt": "hello"}), 400)


def test_input_to_chat_endpoint_is_400(http: httpx.Client) -> None:
    msg = _error(http.post(INVOKE_CHAT, json={"input": ["hello"]}), 400)
    assert CHAT in msg
    # The OpenAI route reaches the same check.
    r = http.post("/serving-endpoints/embeddings", json={"model": CHAT, "input": "hello"})
    _error(r, 400)


def test_both_messages_and_prompt_is_400(http: httpx.Client) -> None:
    msg = _error(http.post(INVOKE_CHAT, json={"messages": HI, "prompt": "x"}), 400)
    assert "'messages'" in msg and "'prompt'" in msg


def test_missing_task_field_is_400(http: httpx.Client) -> None:
    msg = _error(http.post(INVOKE_CHAT, json={"max_tokens": 4}), 400)
    assert "'messages'" in msg
    msg = _error(http.post(INVOKE_EMBED, json={}), 400)
    assert "'input'" in msg


@pytest.mark.parametrize("body", [{"input": []}, {"input": 5}, {"input": [1, 2]},
                                  {"input": "x", "encoding_format": "int8"}])
def test_bad_embeddings_input_is_400(http: httpx.Client, body: dict[str, Any]) -> None:
    _error(http.post(INVOKE_EMBED, json=body), 400)


def test_prompt_over_context_is_400(http: httpx.Client) -> None:
    long = "hello " * 9000
    r = http.post(INVOKE_CHAT, json={"messages": [{"role": "user", "content": long}],
                                     "max_tokens": 4})
    msg = _error(r, 400, "INVALID_PARAMETER_VALUE")
    assert "context" in msg and "8192" in msg
    r = http.post(INVOKE_CHAT, json={"prompt": long, "max_tokens": 4, "stream": True})
    assert "context" in _error(r, 400)
    # The worker is still fine afterwards.
    assert _chat(http, "Hi", max_tokens=2)["choices"][0]["message"]["content"]


def test_body_over_4mb_is_rejected(http: httpx.Client) -> None:
    big = json.dumps({"input": ["x" * 1024] * 5000})  # ~5 MB
    r = http.post(INVOKE_EMBED, content=big, headers={"Content-Type": "application/json"})
    msg = _error(r, (413, 400))
    assert "MB" in msg
    # Just under the limit is fine as far as the body size goes.
    ok = http.post(INVOKE_EMBED, json={"input": "small"})
    assert ok.status_code == 200


@pytest.mark.parametrize("depth", [65, 1000, 5000, 100_000])
def test_deeply_nested_body_is_400_on_every_route_family(http: httpx.Client, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    bodies = {
        INVOKE_CHAT: '{"messages": [{"role": "user", "content": "hi"}], "x": %s}',
        "/serving-endpoints/chat/completions": '{"model": "' + CHAT + '", "messages": %s}',
        "/api/2.0/serving-endpoints": '{"name": "deep", "config": %s}',
        "/api/2.0/secrets/put": '{"scope": "s", "key": "k", "string_value": %s}',
    }
    for url, template in bodies.items():
        r = http.post(url, content=template % nested, headers={"Content-Type": "application/json"})
        assert "64 levels" in _error(r, 400), url
    assert http.get("/api/2.0/serving-endpoints/deep").status_code == 404  # nothing stored
    # A real schema nested a dozen levels (well under the bound) is served.
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(12):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    r = http.post(INVOKE_CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2, "response_format": {
                                         "type": "json_schema",
                                         "json_schema": {"name": "d", "schema": schema}}})
    assert r.status_code == 200, r.text


def test_wrong_method_is_json_error(http: httpx.Client) -> None:
    r = http.get(INVOKE_CHAT)
    _error(r, 405)


# -- invocations behaviour -----------------------------------------------------------------


def test_served_model_name_header(http: httpx.Client) -> None:
    r = http.post(INVOKE_CHAT, json={"messages": HI, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    assert r.headers["served-model-name"] == CHAT
    r = http.post(INVOKE_EMBED, json={"input": "hello"})
    assert r.headers["served-model-name"] == EMBED
    with http.stream("POST", INVOKE_CHAT, json={"messages": HI, "max_tokens": 2,
                                                "stream": True}) as s:
        assert s.status_code == 200
        assert s.headers["served-model-name"] == CHAT
        s.read()


def test_stream_is_plain_sse(http: httpx.Client) -> None:
    """Only ``data:`` lines, ending in ``data: [DONE]`` (mlflow rejects anything else)."""
    body = {"messages": [{"role": "user", "content": "Tell me a joke."}], "max_tokens": 8,
            "temperature": 0}
    with http.stream("POST", INVOKE_CHAT, json={**body, "stream": True}) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines() if ln.strip()]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    full = http.post(INVOKE_CHAT, json=body).json()
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == full["usage"]


def test_stop_sequence_cuts_the_answer(http: httpx.Client) -> None:
    q = "Describe the ocean in one sentence."
    base = _chat(http, q, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    words = [w for w in base.split() if w.isalpha() and len(w) >= 3]
    assert len(words) >= 3, base
    # A word from the middle whose first occurrence is not at the very start.
    word = next(w for w in words[len(words) // 2:] + words[1:] if base.index(w) > 0)
    cut = _chat(http, q, max_tokens=24, temperature=0, stop=[word])
    choice = cut["choices"][0]
    assert choice["message"]["content"] == base[:base.index(word)]
    assert choice["finish_reason"] == "stop"
    assert word not in choice["message"]["content"]
    assert cut["usage"]["completion_tokens"] < 24
    # A plain string stop works too, and a stop that never occurs changes nothing.
    assert _chat(http, q, max_tokens=24, temperature=0,
                 stop=word)["choices"][0]["message"]["content"] == base[:base.index(word)]
    never = _chat(http, q, max_tokens=24, temperature=0, stop=["\u2603\u2603"])
    assert never["choices"][0]["message"]["content"] == base


def test_seed_makes_sampling_reproducible(http: httpx.Client) -> None:
    q = "Write a creative name for a cat."
    kw = {"max_tokens": 16, "temperature": 1.0}
    a = _chat(http, q, seed=1234, **kw)["choices"][0]["message"]["content"]
    b = _chat(http, q, seed=1234, **kw)["choices"][0]["message"]["content"]
    assert a and a == b
    others = {_chat(http, q, seed=s, **kw)["choices"][0]["message"]["content"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # different seeds sample different texts


def test_n_choices(http: httpx.Client) -> None:
    r = _chat(http, "Give me a random word.", n=3, max_tokens=6, temperature=1.0)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" for c in r["choices"])
    assert all(c["message"]["content"] for c in r["choices"])
    u = r["usage"]
    assert 0 < u["completion_tokens"] <= 3 * 6
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    one = _chat(http, "Give me a random word.", max_tokens=6, temperature=1.0)
    assert one["usage"]["prompt_tokens"] == u["prompt_tokens"]  # prompt counted once


def test_completions_prompt_list(http: httpx.Client) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    r = http.post(INVOKE_CHAT, json={"prompt": prompts, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    texts = [c["text"] for c in body["choices"]]
    assert all(t.strip() for t in texts)
    assert texts[0] != texts[1]
    assert "5" in texts[1]  # the counting prompt continues with 5
    single = http.post(INVOKE_CHAT, json={"prompt": prompts[0], "max_tokens": 6,
                                          "temperature": 0}).json()
    assert single["choices"][0]["text"] == texts[0]
    assert body["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"]


def test_embeddings_similarity(http: httpx.Client) -> None:
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a mat.",
                 "Quarterly revenue grew by 8%."]
    r = http.post(INVOKE_EMBED, json={"input": sentences})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vecs = [d["embedding"] for d in body["data"]]
    assert all(len(v) == 384 for v in vecs)
    similar = _cos(vecs[0], vecs[1])
    unrelated = max(_cos(vecs[0], vecs[2]), _cos(vecs[1], vecs[2]))
    assert similar > unrelated + 0.2, (similar, unrelated)
    assert similar > 0.6
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    assert "completion_tokens" not in body["usage"]
    # Input order is kept: embedding one sentence alone gives the same vector.
    alone = http.post(INVOKE_EMBED, json={"input": sentences[2]}).json()["data"][0]["embedding"]
    assert _cos(alone, vecs[2]) > 0.9999
    assert alone != vecs[0]


def test_embeddings_usage_counts_tokens(http: httpx.Client) -> None:
    short = http.post(INVOKE_EMBED, json={"input": "hi"}).json()["usage"]["prompt_tokens"]
    longer = http.post(INVOKE_EMBED, json={"input": "hi " * 50}).json()["usage"]["prompt_tokens"]
    assert 0 < short < longer


def test_served_model_invocations_path(http: httpx.Client) -> None:
    path = f"/serving-endpoints/{CHAT}/served-models/{CHAT}/invocations"
    r = http.post(path, json={"messages": HI, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["served-model-name"] == CHAT
    direct = http.post(INVOKE_CHAT, json={"messages": HI, "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == \
        direct.json()["choices"][0]["message"]["content"]
    e = http.post(f"/serving-endpoints/{EMBED}/served-models/{EMBED}/invocations",
                  json={"input": "hello"})
    assert e.status_code == 200 and len(e.json()["data"][0]["embedding"]) == 384
    msg = _error(http.post(f"/serving-endpoints/{CHAT}/served-models/nope/invocations",
                           json={"messages": HI}), 404, "RESOURCE_DOES_NOT_EXIST")
    assert "nope" in msg
    _error(http.post(f"/serving-endpoints/nope/served-models/{CHAT}/invocations",
                     json={"messages": HI}), 404, "RESOURCE_DOES_NOT_EXIST")


def test_openai_route_requires_model(http: httpx.Client) -> None:
    msg = _error(http.post("/serving-endpoints/chat/completions", json={"messages": HI}), 400)
    assert "'model'" in msg
    _error(http.post("/v1/chat/completions", json={"model": "nope", "messages": HI}), 404,
           "RESOURCE_DOES_NOT_EXIST")


def test_unknown_extra_params_key_is_400(http: httpx.Client) -> None:
    r = http.post(INVOKE_CHAT, json={"messages": HI, "extra_params": {"bogus": 1}})
    assert "bogus" in _error(r, 400)
    ok = http.post(INVOKE_CHAT, json={"messages": HI, "max_tokens": 3,
                                      "extra_params": {"top_k": 1}})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("url", ["/v1/completions", "/serving-endpoints/completions"])
def test_openai_completions_default_to_16_tokens(http: httpx.Client, url: str) -> None:
    r = http.post(url, json={"model": CHAT, "temperature": 0,
                             "prompt": "Write a very long story about the sea. Once upon a time"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 16
    assert body["choices"][0]["finish_reason"] == "length"
    r = http.post(url, json={"model": CHAT, "temperature": 0, "max_tokens": 20,
                             "prompt": "Write a very long story about the sea. Once upon a time"})
    assert r.json()["usage"]["completion_tokens"] == 20


def test_requests_without_max_tokens_get_the_server_ceiling(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from fmserve.config import ServerConfig
    from fmserve.engines.local import LlamaBackend, sampling_params
    from fmserve.protocol.chat import CompletionRequest
    from fmserve.serving.endpoints import bundled_endpoints

    monkeypatch.setenv("FMSERVE_MAX_TOKENS_DEFAULT", "7")
    chat = next(ep for ep in bundled_endpoints(ServerConfig(data_dir=tmp_path))
                if ep.name == CHAT)
    backends = [e.backend for e in chat.entities]
    assert backends and all(isinstance(b, LlamaBackend) and b.default_max_tokens == 7
                            for b in backends)

    assert sampling_params(CompletionRequest(prompt="x"), False, 4096)["max_tokens"] == 4096
    assert sampling_params(CompletionRequest(prompt="x", max_tokens=3), False,
                           4096)["max_tokens"] == 3
    assert sampling_params(CompletionRequest(prompt="x", max_completion_tokens=5), False,
                           4096)["max_tokens"] == 5


def test_openai_routes_carry_both_error_shapes(http: httpx.Client) -> None:
    """OpenAI clients read ``error.{message,type,code}``; Databricks clients (which call
    /invocations) read ``error_code``/``message``."""
    for url in ("/v1/chat/completions", "/serving-endpoints/chat/completions"):
        r = http.post(url, json={"model": "no-such-endpoint", "messages": [
            {"role": "user", "content": "hi"}]})
        body = r.json()
        assert r.status_code == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        assert body["error"] == {"message": body["message"], "type": "not_found_error",
                                 "param": None, "code": "RESOURCE_DOES_NOT_EXIST"}
    r = http.post("/v1/completions", json={"model": CHAT, "prompt": "x", "n": 99})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/no-such-route", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "ENDPOINT_NOT_FOUND"
    r = http.post(INVOKE_CHAT, json={"messages": [], "max_tokens": 1})
    assert r.status_code == 400 and set(r.json()) == {"error_code", "message"}
