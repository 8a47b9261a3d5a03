"""External models on ``google-cloud-vertex-ai`` (service-account JWT → OAuth token), Google
embeddings (Gemini ``batchEmbedContents``, Vertex ``:predict`` via databricks-sdk), secrets
never shown, and table tests of the pure translation in ``providers/google_wire.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import Server, create_external, openai_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from databricks.sdk import WorkspaceClient
from fakes import google as fg
from fakes.server import FakeServer

from fmserve.protocol.chat import ChatMessage
from fmserve.providers import google_wire as wire

MODEL = "gemini-2.5-flash"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fg.fake() as server:
        yield server


@pytest.fixture(scope="module")
def vx(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "google-vertex-chat",
                    fg.external_model(fake.url, provider="google-cloud-vertex-ai"))
    return "google-vertex-chat"


@pytest.fixture(scope="module")
def ep(gateway: Server, fake: FakeServer) -> str:
    create_external(gateway, "google-chat-2", fg.external_model(fake.url))
    return "google-chat-2"


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai_for(gateway)


def user(text: str) -> Any:
    return {"role": "user", "content": text}


# -- Vertex AI -------------------------------------------------------------------------------
def test_vertex_token_once_then_bearer(client: openai.OpenAI, fake: FakeServer, vx: str) -> None:
    before = fake.state.token_requests  # type: ignore[attr-defined]
    for text in ("one", "two"):
        r = client.chat.completions.create(model=vx, messages=[user(text)])
        assert r.choices[0].message.content == f"Echo: {text} [system: ] [turns: 1] [images: 0]"
    chunks = list(client.chat.completions.create(model=vx, messages=[user("three")],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("Echo: three")
    tokens = [q for q in fake.requests if q.path == "/token"]
    assert fake.state.token_requests - before <= 1 and len(tokens) == 1  # type: ignore[attr-defined]
    form = dict(x.split("=", 1) for x in tokens[0].body.decode().split("&"))
    assert form["grant_type"] == "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
    claims = json.loads(base64.urlsafe_b64decode(form["assertion"].split(".")[1] + "=="))
    assert claims["iss"] == fg.CLIENT_EMAIL and claims["aud"] == f"{fake.url}/token"
    assert claims["exp"] - claims["iat"] == 3600 and claims["scope"] == fg.SCOPE
    base = f"/v1/projects/{fg.PROJECT}/locations/{fg.REGION}/publishers/google/models/{MODEL}"
    vertex = [q for q in fake.requests if q.path.startswith("/v1/projects/")][-3:]
    assert [q.path for q in vertex] == [f"{base}:generateContent"] * 2 + [
        f"{base}:streamGenerateContent"]
    assert vertex[2].query == {"alt": "sse"}
    issued = {f"Bearer {t}" for t in fake.state.tokens}  # type: ignore[attr-defined]
    assert len(issued) == 1 and {q.headers["authorization"] for q in vertex} == issued
    assert all("x-goog-api-key" not in q.headers for q in vertex)


def test_vertex_bad_config_is_400(gateway: Server, fake: FakeServer) -> None:
    good = fg.external_model(fake.url, provider="google-cloud-vertex-ai")
    cfg = good["google_cloud_vertex_ai_config"]
    with gateway.client() as http:
        for bad, needle in (({**cfg, "private_key_plaintext": "not json"}, "service-account"),
                            ({k: v for k, v in cfg.items() if k != "region"}, "region")):
            r = http.post("/api/2.0/serving-endpoints", json={
                "name": "google-vertex-bad", "config": {"served_entities": [
                    {"external_model": {**good, "google_cloud_vertex_ai_config": bad}}]}})
            assert r.status_code == 400 and needle in r.json()["message"], r.text


def test_vertex_token_refused_is_401(gateway: Server, fake: FakeServer) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    em = fg.external_model(fake.url, provider="google-cloud-vertex-ai")
    sa = {**json.loads(fg.service_account_json()), "private_key": pem}
    em["google_cloud_vertex_ai_config"]["private_key_plaintext"] = json.dumps(sa)
    create_external(gateway, "google-vertex-wrong-key", em)
    with gateway.client() as http:
        r = http.post("/serving-endpoints/chat/completions", json={
            "model": "google-vertex-wrong-key", "messages": [user("hi")]})
    assert r.status_code == 401 and "Invalid JWT Signature" in r.json()["message"], r.text
    assert pem.splitlines()[1] not in r.text + gateway.log()


# -- embeddings ------------------------------------------------------------------------------
def test_gemini_embeddings(client: openai.OpenAI, gateway: Server, fake: FakeServer) -> None:
    create_external(gateway, "google-embed", fg.external_model(
        fake.url, task="llm/v1/embeddings", name="text-embedding-004"))
    r = client.embeddings.create(model="google-embed", input=["a", "b"], dimensions=4)
    rec = fake.last()
    assert rec.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert rec.json() == {"requests": [
        {"model": "models/text-embedding-004", "outputDimensionality": 4,
         "content": {"parts": [{"text": t}]}} for t in ("a", "b")]}
    assert [len(d.embedding) for d in r.data] == [4, 4] and r.data[0].embedding != \
        r.data[1].embedding


def test_vertex_embeddings_with_sdk(gateway: Server, fake: FakeServer) -> None:
    create_external(gateway, "google-vertex-embed", fg.external_model(
        fake.url, task="llm/v1/embeddings", name="text-embedding-005",
        provider="google-cloud-vertex-ai"))
    ws = WorkspaceClient(host=gateway.url, token=gateway.token)
    r = ws.serving_endpoints.query(name="google-vertex-embed", input=["hello", "world"])
    rec = fake.last()
    assert rec.path.endswith("/models/text-embedding-005:predict")
    assert rec.headers["authorization"].startswith("Bearer ya29.fake-")
    assert rec.json() == {"instances": [{"content": "hello"}, {"content": "world"}]}
    assert r.data and len(r.data) == 2 and len(r.data[0].embedding or []) == 8
    assert r.usage is not None


# -- secrets ---------------------------------------------------------------------------------
def test_keys_never_exposed(gateway: Server, ep: str, vx: str) -> None:
    pem_line = fg.PEM.splitlines()[1]
    with gateway.client() as http:
        texts = [http.get(f"/api/2.0/serving-endpoints/{n}").text for n in (ep, vx)]
        texts.append(http.get("/api/2.0/serving-endpoints").text)
    texts.append(gateway.log())
    for t in texts:
        assert fg.API_KEY not in t and pem_line not in t and "ya29.fake" not in t


# -- pure translation (google_wire) ----------------------------------------------------------
@pytest.mark.parametrize("raw,calls,want", [
    ("STOP", False, "stop"), ("MAX_TOKENS", False, "length"), ("SAFETY", False, "content_filter"),
    ("RECITATION", False, "content_filter"), ("STOP", True, "tool_calls"),
    ("MAX_TOKENS", True, "length"), ("OTHER", False, "stop"), (None, True, "tool_calls")])
def test_finish_reason(raw: str | None, calls: bool, want: str) -> None:
    assert wire.finish_reason(raw, calls) == want


def test_from_response_parts_signatures_and_usage() -> None:
    answer, usage = wire.from_response({
        "candidates": [{"content": {"role": "model", "parts": [
            {"text": "plan", "thought": True, "thoughtSignature": "s0"},
            {"text": "Hello"},
            {"text": "", "thoughtSignature": "s1"},
            {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "s2"},
            {"functionCall": {"name": "g", "args": {}}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5,
                          "thoughtsTokenCount": 7, "totalTokenCount": 22}})
    assert usage == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22,
                     "reasoning_tokens": 7}
    assert answer.finish_reason == "tool_calls" and answer.text == "Hello"
    assert [(r.text, r.signature) for r in answer.reasoning] == [("plan", "s0"), ("", "s1")]
    ids = [c["id"] for c in answer.tool_calls]
    assert ids[0].endswith(f"{wire.SIG_SEP}s2") and wire.SIG_SEP not in ids[1]
    assert [wire.signature_of_call(c) for c in answer.tool_calls] == ["s2", None]
    assert json.loads(answer.tool_calls[0]["function"]["arguments"]) == {"a": 1}
    # …and back: every signature on the part it came from
    msg = ChatMessage.model_validate(answer.message())
    assert wire._assistant_parts(msg) == [
        {"text": "plan", "thought": True, "thoughtSignature": "s0"},
        {"text": "Hello", "thoughtSignature": "s1"},
        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "s2"},
        {"functionCall": {"name": "g", "args": {}}}]


def test_blocked_prompt_is_content_filter() -> None:
    answer, usage = wire.from_response({"promptFeedback": {"blockReason": "SAFETY"},
                                        "usageMetadata": {"promptTokenCount": 4}})
    assert answer.finish_reason == "content_filter" and answer.text == ""
    assert usage["prompt_tokens"] == 4


def test_clean_schema_drops_only_rejected_keywords() -> None:
    schema = {"$schema": "x", "type": "object", "additionalProperties": False,
              "properties": {"a": {"$id": "y", "type": "string"}}}
    assert wire.clean_schema(schema) == {"type": "object", "additionalProperties": False,
                                         "properties": {"a": {"type": "string"}}}
