"""The same scenarios against every external provider: a provider × scenario matrix.

Each provider's fake (``tests/fakes/<provider>.py``) speaks its vendor's wire format on
top of the shared fake model (``tests/fakes/brain.py``), so the expected answers are
the same everywhere. Requests go through fmserve's OpenAI-compatible route with plain
HTTP, so retries of client libraries cannot hide an error status. The matrix is
printed at the end of the module (``pytest -s tests/test_conformance.py`` or in the
terminal summary).
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import Server, create_external
from PIL import Image


def _databricks(mod: Any, url: str) -> dict[str, Any]:
    return {"provider": "databricks-model-serving", "name": "remote-chat", "task": "llm/v1/chat",
            "databricks_model_serving_config": {"databricks_workspace_url": url,
                                                "databricks_api_token_plaintext": mod.API_KEY}}


# column → (fake module, external_model builder)
COLUMNS: dict[str, tuple[str, Callable[[Any, str], dict[str, Any]]]] = {
    "openai": ("openai", lambda m, url: m.external_model(url)),
    "databricks": ("openai", _databricks),
    "anthropic": ("anthropic", lambda m, url: m.external_model(url)),
    "google": ("google", lambda m, url: m.external_model(url)),
    "vertex": ("google", lambda m, url: m.external_model(
        url, provider="google-cloud-vertex-ai")),
    "bedrock": ("bedrock", lambda m, url: m.external_model(url)),
    "cohere": ("cohere", lambda m, url: m.external_model(url)),
}
PROVIDERS = list(COLUMNS)
# Scenarios a provider cannot serve must be a clear 400 instead.
UNSUPPORTED = {"cohere": {"thinking", "images", "stream-thinking"}}
# OpenAI's Chat Completions API returns no reasoning text, only usage.reasoning_tokens.
REASONING_TOKENS_ONLY = {"openai"}
# Providers whose reasoning blocks carry a signature (Gemini signs the parts after them).
SIGNED_REASONING = {"anthropic", "bedrock", "databricks"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def _png(w: int = 300, h: int = 240) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


TOOL_TURN = [user("What is the weather in Paris?"),
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]


def _text(msg: dict[str, Any]) -> str:
    c = msg.get("content")
    if isinstance(c, list):
        return "".join(b.get("text", "") for b in c if b.get("type") == "text")
    return c or ""


def _calls(msg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in msg.get("tool_calls") or []]


def check_plain(a: dict[str, Any]) -> None:
    assert _text(a["choices"][0]["message"]).startswith("Echo: hello there")
    assert a["choices"][0]["finish_reason"] == "stop"
    u = a["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def check_tool(names: list[str]) -> Callable[[dict[str, Any]], None]:
    def check(a: dict[str, Any]) -> None:
        c = a["choices"][0]
        assert c["finish_reason"] == "tool_calls", c
        calls = _calls(c["message"])
        assert [n for n, _ in calls] == names, calls
        for n, args in calls:
            assert args == ({"city": "Paris"} if n == "get_weather" else {"tz": "Paris"})
        ids = [t["id"] for t in c["message"]["tool_calls"]]
        assert all(ids) and len(set(ids)) == len(ids)
    return check


def check_thinking(a: dict[str, Any]) -> None:
    content = a["choices"][0]["message"]["content"]
    assert isinstance(content, list) and content[0]["type"] == "reasoning", content
    summary = content[0]["summary"][0]
    assert summary["type"] == "summary_text" and summary["text"].startswith("Thinking about")
    assert content[-1] == {"type": "text", "text": content[-1]["text"]}
    assert content[-1]["text"].startswith("Echo: why")
    assert a["usage"].get("reasoning_tokens", 0) > 0


def check_thinking_tokens(a: dict[str, Any]) -> None:
    assert _text(a["choices"][0]["message"]).startswith("Echo: why")
    assert a["usage"].get("reasoning_tokens", 0) > 0, a["usage"]


def _check(name: str, scenario: str) -> Callable[[dict[str, Any]], None]:
    if scenario == "thinking" and name in REASONING_TOKENS_ONLY:
        return check_thinking_tokens
    return SCENARIOS[scenario][1]


def check_json(a: dict[str, Any]) -> None:
    value = json.loads(_text(a["choices"][0]["message"]))
    assert set(value) == {"name", "age", "tags"} and isinstance(value["age"], int)


SCENARIOS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], None]]] = {
    "plain": ({"messages": [user("hello there")]}, check_plain),
    "system": ({"messages": [{"role": "system", "content": "Be brief."}, user("hi")]},
               lambda a: _assert_in("[system: Be brief.]", a)),
    "multi-turn": ({"messages": [user("one"), {"role": "assistant", "content": "two"},
                                 user("three")]}, lambda a: _assert_in("[turns: 3]", a)),
    "tools-auto": ({"messages": [user("weather in Paris?")], "tools": [WEATHER]},
                   check_tool(["get_weather"])),
    "tools-required": ({"messages": [user("hi")], "tools": [WEATHER],
                        "tool_choice": "required"}, check_tool(["get_weather"])),
    "tools-named": ({"messages": [user("hi")], "tools": [WEATHER, TIME],
                     "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                    check_tool(["get_time"])),
    "parallel-tools": ({"messages": [user("parallel weather and time please")],
                        "tools": [WEATHER, TIME]}, check_tool(["get_weather", "get_time"])),
    "tool-result": ({"messages": TOOL_TURN, "tools": [WEATHER]},
                    lambda a: _assert_in("Tool said: sunny, 21C", a)),
    "thinking": ({"messages": [user("why is the sky blue")], "max_tokens": 4096,
                  "thinking": {"type": "enabled", "budget_tokens": 1024}}, check_thinking),
    "images": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": _png()}}]}]},
        lambda a: _assert_in("[images: 1]", a)),
    "json-schema": ({"messages": [user("a person")], "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                               "strict": True}}}, check_json),
}
STREAMED = ["plain", "tools-auto", "parallel-tools", "thinking", "json-schema"]
ERRORS = {"400": 400, "401": 401, "429": 429, "500": 502, "timeout": 504}


def _assert_in(needle: str, a: dict[str, Any]) -> None:
    text = _text(a["choices"][0]["message"])
    assert needle in text, text


def assemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed chat answer folded into a non-streamed one (checks delta invariants)."""
    text, reasoning, calls, finish = "", [], {}, None
    usage: dict[str, Any] = {}
    for i, ev in enumerate(events):
        assert "error_code" not in ev, ev
        assert ev["object"] == "chat.completion.chunk"
        usage = ev.get("usage") or usage
        for ch in ev["choices"]:
            d = ch.get("delta") or {}
            if i == 0:
                assert d.get("role") == "assistant"
            c = d.get("content")
            if isinstance(c, str):
                text += c
            elif isinstance(c, list):
                for item in c:
                    if item["type"] == "reasoning":
                        for s in item["summary"]:
                            if reasoning and not reasoning[-1].get("signature"):
                                reasoning[-1]["text"] += s.get("text", "")
                                if s.get("signature"):
                                    reasoning[-1]["signature"] = s["signature"]
                            else:
                                reasoning.append(dict(s))
                    elif item["type"] == "text":
                        text += item["text"]
            for tc in d.get("tool_calls") or []:
                idx = tc["index"]
                if idx not in calls:
                    assert tc.get("id") and tc["function"].get("name"), tc  # first delta
                    calls[idx] = {"id": tc["id"], "type": "function",
                                  "function": {"name": tc["function"]["name"], "arguments": ""}}
                else:
                    assert not tc.get("id") or tc["id"] == calls[idx]["id"]
                calls[idx]["function"]["arguments"] += tc["function"].get("arguments") or ""
            finish = ch.get("finish_reason") or finish
    msg: dict[str, Any] = {"role": "assistant"}
    if reasoning:
        msg["content"] = [{"type": "reasoning", "summary": [{"type": "summary_text", **s}]}
                          for s in reasoning] + [{"type": "text", "text": text}]
        for block in msg["content"][:-1]:
            block["summary"][0]["type"] = "summary_text"
    else:
        msg["content"] = text or None
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"choices": [{"index": 0, "message": msg, "finish_reason": finish}], "usage": usage}


def stream_events(http: httpx.Client, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    events = []
    with http.stream("POST", "/serving-endpoints/chat/completions",
                     json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for ln in lines[:-1]:
        assert ln.startswith("data: "), ln
        events.append(json.loads(ln[6:]))
    return 200, events


RESULTS: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _matrix(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    cols = [*SCENARIOS, *(f"stream:{s}" for s in STREAMED), "stream:reset",
            *(f"err:{e}" for e in ERRORS)]
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    width = max(len(c) for c in cols)
    lines = ["", "external providers × scenarios (ok / 400 = refused as unsupported / FAIL)",
             f"{'scenario':<{width}}  " + "  ".join(f"{p:<10}" for p in PROVIDERS)]
    for c in cols:
        lines.append(f"{c:<{width}}  " + "  ".join(
            f"{RESULTS.get(p, {}).get(c, '-'):<10}" for p in PROVIDERS))
    for line in lines:
        tr.write_line(line) if tr else print(line)


@pytest.fixture(scope="module", params=PROVIDERS)
def provider(request: pytest.FixtureRequest, gateway: Server) -> Iterator[tuple[str, httpx.Client,
                                                                                 str]]:
    name = request.param
    module, external_model = COLUMNS[name]
    mod = importlib.import_module(f"fakes.{module}")
    fake = mod.fake().start()
    endpoint = f"conf-{name}"
    try:
        create_external(gateway, endpoint, external_model(mod, fake.url))
        with gateway.client() as http:
            yield name, http, endpoint
    finally:
        fake.stop()


def _record(provider: str, scenario: str, run: Callable[[], None]) -> None:
    RESULTS.setdefault(provider, {})[scenario] = "FAIL"
    run()
    RESULTS[provider][scenario] = "ok"


def _unsupported(http: httpx.Client, body: dict[str, Any], provider: str, scenario: str) -> None:
    r = http.post("/serving-endpoints/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    RESULTS.setdefault(provider, {})[scenario] = "400"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(provider: tuple[str, httpx.Client, str], scenario: str) -> None:
    name, http, endpoint = provider
    body, check = SCENARIOS[scenario][0], _check(name, scenario)
    body = {**body, "model": endpoint}
    if scenario in UNSUPPORTED.get(name, ()):
        return _unsupported(http, body, name, scenario)

    def run() -> None:
        r = http.post("/serving-endpoints/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["served-model-name"]
        a = r.json()
        assert a["model"] == endpoint and a["object"] == "chat.completion"
        check(a)
        if scenario == "thinking" and name in SIGNED_REASONING:
            assert a["choices"][0]["message"]["content"][0]["summary"][0].get("signature")
    _record(name, scenario, run)


@pytest.mark.parametrize("scenario", STREAMED)
def test_stream(provider: tuple[str, httpx.Client, str], scenario: str) -> None:
    name, http, endpoint = provider
    body, check = SCENARIOS[scenario][0], _check(name, scenario)
    body = {**body, "model": endpoint}
    if scenario in UNSUPPORTED.get(name, ()) or f"stream-{scenario}" in UNSUPPORTED.get(name, ()):
        return _unsupported(http, {**body, "stream": True}, name, f"stream:{scenario}")

    def run() -> None:
        status, events = stream_events(http, body)
        assert status == 200, events
        assert len(events) >= 2
        check(assemble(events))
    _record(name, f"stream:{scenario}", run)


def test_stream_reset(provider: tuple[str, httpx.Client, str]) -> None:
    name, http, endpoint = provider

    def run() -> None:
        status, events = stream_events(http, {"model": endpoint,
                                              "messages": [user("hello FAIL:reset")]})
        if status != 200:  # broke before the first event: a plain error answer
            assert status in (502, 504), events
            return
        last = events[-1]
        assert last["error_code"] in ("BAD_GATEWAY", "DEADLINE_EXCEEDED"), last
        assert last["error"]["message"]
    _record(name, "stream:reset", run)


@pytest.mark.parametrize("fail", list(ERRORS))
def test_error(provider: tuple[str, httpx.Client, str], fail: str) -> None:
    name, http, endpoint = provider

    def run() -> None:
        r = http.post("/serving-endpoints/chat/completions",
                      json={"model": endpoint, "messages": [user(f"hello FAIL:{fail}")]})
        assert r.status_code == ERRORS[fail], r.text
        body = r.json()
        assert body["error_code"] and body["message"]
        if fail != "timeout":  # the provider's own message is kept
            assert re.search(r"HTTP \d{3}\)?: \S", body["message"]), body
        if fail == "429":
            assert int(r.headers["Retry-After"]) >= 1
    _record(name, f"err:{fail}", run)
