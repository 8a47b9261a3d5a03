"""AI Gateway guardrails on a real server (governance §1.4), through real clients:
keyword and PII blocks and masks on input and output, streamed and not, the scripted
safety classifier, fallbacks that do not bypass them, valid_topics with the bundled
MiniLM, a local model, and config-time refusals that change nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import Server, create_external, openai_for, start_server, stop_server, wait_for
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from fakes import llama_guard
from fakes import openai as fake_openai
from fakes.server import FakeServer

EMAIL, PHONE = "bob.jones@example.com", "+1 415-555-0100"
FILLER = "This is a harmless sentence about the weather and gardens. " * 6  # ~360 chars


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fake_openai.fake() as server:
        yield server


@pytest.fixture(scope="module")
def guard() -> Iterator[FakeServer]:
    with llama_guard.fake() as server:
        yield server


@pytest.fixture(scope="module")
def srv(guard: FakeServer) -> Iterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-guard-"))
    s = start_server(tmp, env_extra={"FMSERVE_SAFETY_ENDPOINT": "safety-guard"},
                     serve_args=("--no-bundled",))
    try:
        create_external(s, "safety-guard", fake_openai.external_model(guard.url))
        yield s
    finally:
        stop_server(s)
        shutil.rmtree(tmp, ignore_errors=True)


def guarded(srv: Server, fake: FakeServer, name: str, guardrails: dict[str, Any],
            **gw: Any) -> None:
    create_external(srv, name, fake_openai.external_model(fake.url))
    with srv.client() as c:
        r = c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway",
                  json={"guardrails": guardrails, **gw})
        assert r.status_code == 200, r.text
        assert r.json()["guardrails"] == guardrails


def block_of(r: httpx.Response) -> dict[str, Any]:
    """The §1.4 block body: 400, BAD_REQUEST, message a JSON string."""
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error_code"] == "BAD_REQUEST"
    return json.loads(body["message"])  # type: ignore[no-any-return]


def chat(srv: Server, name: str, text: str, **kw: Any) -> httpx.Response:
    with srv.client() as c:
        return c.post(f"/serving-endpoints/{name}/invocations",
                      json={"messages": [{"role": "user", "content": text}], **kw})


def stream_text(client: openai.OpenAI, name: str, text: str) -> tuple[str, Exception | None]:
    """The streamed answer's text and the error that ended it (None: it completed)."""
    got = []
    try:
        for chunk in client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": text}], stream=True):
            for ch in chunk.choices:
                got.append(ch.delta.content or "")
    except openai.APIError as exc:
        return "".join(got), exc
    return "".join(got), None


def last_user_text(fake: FakeServer) -> str:
    body = json.loads(fake.last().body)
    return str(body["messages"][-1]["content"])


def test_input_keyword_blocks_before_the_model_is_called(srv: Server, fake: FakeServer) -> None:
    guarded(srv, fake, "g-kw-in", {"input": {"invalid_keywords": ["secret", "top plan"]}})
    before = len(fake.requests)
    block = block_of(chat(srv, "g-kw-in", "my SECRET is 42"))
    assert block["finishReason"] == "input_guardrail_triggered"
    assert block["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    entry = block["input_guardrail"][0]
    assert entry["flagged"] is True and entry["invalid_keywords"] == ["secret"]
    assert block_of(chat(srv, "g-kw-in", "about the top plan."))["input_guardrail"][0][
        "invalid_keywords"] == ["top plan"]
    assert len(fake.requests) == before  # nothing reached the provider
    # whole words only
    for ok in ("my secretary", "secrets are fun", "unsecret"):
        assert chat(srv, "g-kw-in", ok).status_code == 200
    # the openai client: BadRequestError whose text carries the finish reason; streams too
    client = openai_for(srv)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="g-kw-in", stream=stream,
                                           messages=[{"role": "user", "content": "a secret"}])
        assert "input_guardrail_triggered" in str(exc.value)
        assert json.loads(exc.value.body["message"])["finishReason"] == \
            "input_guardrail_triggered"  # type: ignore[index]


def test_output_keyword_blocks_streamed_and_not(srv: Server, fake: FakeServer) -> None:
    guarded(srv, fake, "g-kw-out", {"output": {"invalid_keywords": ["password"]}})
    block = block_of(chat(srv, "g-kw-out", "say password please"))
    assert block["finishReason"] == "output_guardrail_triggered"
    assert block["output_guardrail"][0]["flagged"] is True
    assert block["usage"]["completion_tokens"] > 0
    assert "password" not in json.dumps(block).replace('"password"]', "")  # no echo
    client = openai_for(srv)
    # mid-stream: text before the keyword arrives, then an error event; never the keyword
    text, err = stream_text(client, "g-kw-out", FILLER + "the password is hunter2 " + FILLER)
    assert isinstance(err, openai.APIError) and "output_guardrail_triggered" in str(err)
    assert text and "password" not in text.lower() and "hunter2" not in text
    assert ("Echo: " + FILLER).startswith(text)
    text, err = stream_text(client, "g-kw-out", "nothing to see here")
    assert err is None and text.startswith("Echo: nothing to see here")


def test_pii_input_block_and_mask(srv: Server, fake: FakeServer) -> None:
    guarded(srv, fake, "g-pii-block", {"input": {"pii": {"behavior": "BLOCK"}}})
    before = len(fake.requests)
    w = WorkspaceClient(host=srv.url, token=srv.token)
    with pytest.raises(DatabricksError) as exc:
        w.serving_endpoints.query("g-pii-block", messages=[ChatMessage(
            role=ChatMessageRole.USER, content=f"email {EMAIL} and card 4111 1111 1111 1111")])
    block = json.loads(str(exc.value))
    assert block["finishReason"] == "input_guardrail_triggered"
    entry = block["input_guardrail"][0]
    assert entry["flagged"] is False and entry["pii_detection"] is True
    assert entry["anonymized_input"] == [
        {"role": "user", "content": "email <EMAIL_ADDRESS> and card <CREDIT_CARD>"}]
    assert len(fake.requests) == before

    guarded(srv, fake, "g-pii-mask", {"input": {"pii": {"behavior": "MASK"}}})
    client = openai_for(srv)
    for stream in (False, True):
        text = f"call {PHONE} or write {EMAIL}, ip 10.1.2.3"
        if stream:
            answer, err = stream_text(client, "g-pii-mask", text)
            assert err is None
        else:
            answer = client.chat.completions.create(
                model="g-pii-mask", messages=[{"role": "user", "content": text}]
            ).choices[0].message.content or ""
        assert last_user_text(fake) == "call <PHONE_NUMBER> or write <EMAIL_ADDRESS>, ip " \
            "<IP_ADDRESS>"  # what the model received
        assert answer.startswith("Echo: call <PHONE_NUMBER> or write <EMAIL_ADDRESS>")
    # a system prompt and content parts are masked as well
    r = chat(srv, "g-pii-mask", "hi")
    with srv.client() as c:
        r = c.post("/serving-endpoints/g-pii-mask/invocations", json={"messages": [
            {"role": "system", "content": f"Admin is {EMAIL}"},
            {"role": "user", "content": [{"type": "text", "text": f"ring {PHONE}"}]}]})
    assert r.status_code == 200
    sent = json.loads(fake.last().body)["messages"]
    assert sent[0]["content"] == "Admin is <EMAIL_ADDRESS>"
    assert "<PHONE_NUMBER>" in json.dumps(sent[1]) and "415" not in json.dumps(sent)


def test_pii_output_mask_and_block(srv: Server, fake: FakeServer) -> None:
    guarded(srv, fake, "g-pii-out", {"output": {"pii": {"behavior": "MASK"}}})
    client = openai_for(srv)
    text = FILLER + f"mail {EMAIL} now, or {PHONE}. " + FILLER
    whole = client.chat.completions.create(
        model="g-pii-out", messages=[{"role": "user", "content": text}]
    ).choices[0].message.content or ""
    assert last_user_text(fake) == text  # the input is not masked
    assert EMAIL not in whole and "<EMAIL_ADDRESS>" in whole and "<PHONE_NUMBER>" in whole
    streamed, err = stream_text(client, "g-pii-out", text)
    assert err is None and streamed == whole
    # completions too
    done = client.completions.create(model="g-pii-out", prompt=f"x {EMAIL}", max_tokens=64)
    assert EMAIL not in (done.choices[0].text or "")

    guarded(srv, fake, "g-pii-out-block", {"output": {"pii": {"behavior": "BLOCK"}}})
    block = block_of(chat(srv, "g-pii-out-block", f"mail {EMAIL}"))
    assert block["finishReason"] == "output_guardrail_triggered"
    assert block["output_guardrail"][0]["pii_detection"] is True
    assert EMAIL not in json.dumps(block)
    streamed, err = stream_text(client, "g-pii-out-block", text)
    assert isinstance(err, openai.APIError) and "output_guardrail_triggered" in str(err)
    assert "bob" not in streamed and "@" not in streamed and streamed  # a prefix was sent


def test_safety_with_the_scripted_classifier(srv: Server, fake: FakeServer,
                                             guard: FakeServer) -> None:
    guarded(srv, fake, "g-safe", {"input": {"safety": True}, "output": {"safety": True}})
    block = block_of(chat(srv, "g-safe", "how do I make things go kaboom"))
    entry = block["input_guardrail"][0]
    assert block["finishReason"] == "input_guardrail_triggered"
    assert entry["flagged"] is True and entry["categories"] == {"indiscriminate_weapons": True}
    prompt = json.loads(guard.last().body)["messages"][0]["content"]
    assert "User: how do I make things go kaboom" in prompt and "'User' messages" in prompt
    r = chat(srv, "g-safe", "tell me about tulips")
    assert r.status_code == 200, r.text
    judged = json.loads(guard.last().body)["messages"][0]["content"]
    assert "Agent: Echo: tell me about tulips" in judged  # the output was classified too

    guarded(srv, fake, "g-safe-out", {"output": {"safety": True}})
    block = block_of(chat(srv, "g-safe-out", "say something hateful"))
    assert block["finishReason"] == "output_guardrail_triggered"
    assert block["output_guardrail"][0]["categories"] == {"hate": True}
    streamed, err = stream_text(openai_for(srv), "g-safe-out", FILLER + " hateful")
    assert isinstance(err, openai.APIError) and "output_guardrail_triggered" in str(err)
    assert streamed == ""  # a whole-answer check holds all of it back
    streamed, err = stream_text(openai_for(srv), "g-safe-out", FILLER)
    assert err is None and streamed.startswith("Echo: " + FILLER.strip())


def test_fallback_does_not_bypass_guardrails(srv: Server, fake: FakeServer) -> None:
    dead = fake_openai.external_model("http://127.0.0.1:9")  # nothing listens: a 5xx
    live = fake_openai.external_model(fake.url)
    with srv.client() as c:
        c.delete("/api/2.0/serving-endpoints/g-fallback")
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": "g-fallback",
            "config": {"served_entities": [{"name": "dead", "external_model": dead},
                                           {"name": "live", "external_model": live}],
                       "traffic_config": {"routes": [
                           {"served_entity_name": "dead", "traffic_percentage": 100},
                           {"served_entity_name": "live", "traffic_percentage": 0}]}},
            "ai_gateway": {"fallback_config": {"enabled": True}, "guardrails": {
                "input": {"invalid_keywords": ["forbidden"]},
                "output": {"pii": {"behavior": "MASK"}}}}})
        assert r.status_code == 200, r.text
        wait_for(lambda: c.get("/api/2.0/serving-endpoints/g-fallback").json()["state"]
                 ["ready"] == "READY", timeout_s=30, what="g-fallback READY")
    r = chat(srv, "g-fallback", f"write to {EMAIL}")
    assert r.status_code == 200, r.text
    assert r.headers["served-model-name"] == "live"
    assert "<EMAIL_ADDRESS>" in r.json()["choices"][0]["message"]["content"]
    assert EMAIL not in r.text
    assert block_of(chat(srv, "g-fallback", "forbidden words"))["finishReason"] == \
        "input_guardrail_triggered"


@pytest.mark.parametrize("guardrails, field", [
    ({"input": {"invalid_keywords": ["ok"], "colour": "red"}}, "guardrails.input.colour"),
    ({"input": {"pii": {"behavior": "REDACT"}}}, "guardrails.input.pii.behavior"),
    ({"output": {"invalid_keywords": ["fine", "  "]}}, "guardrails.output.invalid_keywords[1]"),
    ({"input": {"valid_topics": ["cooking", 7]}}, "guardrails.input.valid_topics[1]"),
    ({"sideways": {}}, "guardrails.sideways"),
    ({"input": {"valid_topics": ["cooking"]}}, "guardrails.input.valid_topics"),
])
def test_bad_guardrail_config_is_a_400_that_changes_nothing(
        srv: Server, fake: FakeServer, guardrails: dict[str, Any], field: str) -> None:
    guarded(srv, fake, "g-bad", {"input": {"invalid_keywords": ["before"]}})
    with srv.client() as c:
        r = c.put("/api/2.0/serving-endpoints/g-bad/ai-gateway",
                  json={"guardrails": guardrails})
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert field in r.json()["message"]
        if "valid_topics" in field and "[" not in field:  # --no-bundled: no MiniLM here
            assert "databricks-all-minilm-l6-v2" in r.json()["message"]
        stored = c.get("/api/2.0/serving-endpoints/g-bad").json()["ai_gateway"]
        assert stored["guardrails"] == {"input": {"invalid_keywords": ["before"]}}
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": "g-bad-new", "config": {"served_entities": [
                {"external_model": fake_openai.external_model(fake.url)}]},
            "ai_gateway": {"guardrails": guardrails}})
        assert r.status_code == 400, r.text
        assert c.get("/api/2.0/serving-endpoints/g-bad-new").status_code == 404
    assert block_of(chat(srv, "g-bad", "before"))["finishReason"] == "input_guardrail_triggered"


def test_safety_without_a_safety_endpoint_is_a_400(gateway: Server, fake: FakeServer) -> None:
    create_external(gateway, "g-nosafety", fake_openai.external_model(fake.url))
    with gateway.client() as c:
        r = c.put("/api/2.0/serving-endpoints/g-nosafety/ai-gateway",
                  json={"guardrails": {"input": {"safety": True}}})
        assert r.status_code == 400
        assert "guardrails.input.safety" in r.json()["message"]
        assert "FMSERVE_SAFETY_ENDPOINT" in r.json()["message"]
        assert "guardrails" not in (c.get("/api/2.0/serving-endpoints/g-nosafety").json()
                                    .get("ai_gateway") or {})


def test_topics_with_the_bundled_minilm_and_a_local_model(server: Server,
                                                         fake: FakeServer) -> None:
    guarded(server, fake, "g-topics", {"input": {"valid_topics": ["cooking", "recipes"]}})
    try:  # the session server is shared: leave no endpoint behind
        assert chat(server, "g-topics", "How long should I roast a chicken?").status_code == 200
        block = block_of(chat(server, "g-topics", "Explain how a TCP handshake works."))
    finally:
        with server.client() as c:
            c.delete("/api/2.0/serving-endpoints/g-topics")
    entry = block["input_guardrail"][0]
    assert entry["flagged"] is True and entry["categories"] == {"off_topic": True}
    assert entry["category_scores"]["topic_similarity"] < 0.18

    # the bundled SmolLM2 as a user endpoint: the same input guardrails, streamed and not
    name = "g-local"
    with server.client() as c:
        c.delete(f"/api/2.0/serving-endpoints/{name}")
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": name, "config": {"served_entities": [{
                "name": "smol", "entity_name": "system.ai.smollm2-135m-instruct",
                "entity_version": "1"}]},
            "ai_gateway": {"guardrails": {"input": {"invalid_keywords": ["secret"],
                                                    "pii": {"behavior": "BLOCK"}},
                                          "output": {"pii": {"behavior": "MASK"}}}}})
        assert r.status_code == 200, r.text
        wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]
                 ["config_update"] == "NOT_UPDATING", timeout_s=180, what="deployment")
    try:
        client = openai_for(server)
        for stream in (False, True):
            for text, want in (("my secret", None), (f"mail {EMAIL}", "<EMAIL_ADDRESS>")):
                with pytest.raises(openai.BadRequestError) as exc:
                    client.chat.completions.create(
                        model=name, stream=stream, max_tokens=4,
                        messages=[{"role": "user", "content": text}])
                msg = json.loads(exc.value.body["message"])  # type: ignore[index]
                assert msg["finishReason"] == "input_guardrail_triggered"
                if want:
                    assert want in json.dumps(msg["input_guardrail"])
        answer, err = stream_text(client, name, "Say hello.")
        assert err is None and answer
    finally:
        with server.client() as c:
            c.delete(f"/api/2.0/serving-endpoints/{name}")
