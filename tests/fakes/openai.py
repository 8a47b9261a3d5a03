"""A fake OpenAI API (plus Azure OpenAI, Microsoft Entra ID and Databricks serving routes).

Routes (all answers built by :func:`tests.fakes.brain.think`):

* ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` — OpenAI wire format
  (reasoning is hidden: only ``usage.completion_tokens_details.reasoning_tokens``);
  streams end with ``data: [DONE]`` and send a usage-only chunk when
  ``stream_options.include_usage`` is set;
* ``/vllm/v1/...`` — the same, with vLLM/DeepSeek ``reasoning_content`` for reasoning;
* ``/openai/deployments/{deployment}/...?api-version=`` — Azure OpenAI (404 without
  ``api-version``);
* ``/{tenant}/oauth2/v2.0/token`` — Entra client credentials (``access_token`` ``entra-token-N``);
* ``/serving-endpoints/chat/completions`` etc. — Databricks format: reasoning content
  blocks with signatures, cumulative usage on every chunk, ``{"error_code","message"}`` errors.

Failures (``FAIL:`` in the last user text): 400/401/429 (``Retry-After: 7``)/500 in the
OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``; ``timeout`` never
answers; ``reset`` breaks the stream after the first event; ``midstream`` sends a
``data: {"error": ...}`` event after the first chunk; ``nodone`` ends the stream without
``[DONE]``; ``badjson`` answers text that is not JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fakes.brain import Reply, Seen, pieces, think
from fakes.server import FakeServer, sleep_forever

API_KEY = "sk-fake-openai-key-0123456789"
EFFORTS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}
_ERRORS = {"400": (400, "invalid_request_error", None, "Invalid value for 'messages'."),
           "401": (401, "invalid_request_error", "invalid_api_key",
                   "Incorrect API key provided."),
           "429": (429, "requests", "rate_limit_exceeded", "Rate limit reached for requests."),
           "500": (500, "server_error", None, "The server had an error processing your request.")}
_DBX_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 429: "REQUEST_LIMIT_EXCEEDED",
              500: "INTERNAL_ERROR"}


def seen_of(body: dict[str, Any]) -> Seen:
    """An OpenAI chat request, provider-neutral."""
    s = Seen()
    for m in body.get("messages") or []:
        content = m.get("content")
        text, images, reasoning = "", 0, []
        if isinstance(content, str):
            text = content
        for p in content if isinstance(content, list) else []:
            if p.get("type") == "text":
                text += p.get("text") or ""
            elif p.get("type") in ("image_url", "image"):
                images += 1
            elif p.get("type") == "reasoning":
                reasoning += [(x.get("text"), x.get("signature")) for x in p.get("summary") or []]
        if m["role"] in ("system", "developer"):
            s.system += text
            continue
        s.turns.append({"role": m["role"], "text": text, "images": images,
                        "tool_calls": [c["function"]["name"] for c in m.get("tool_calls") or []],
                        "tool_result": text if m["role"] == "tool" else None,
                        "reasoning": reasoning})
    s.tools = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters")}
               for t in body.get("tools") or []]
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        s.tool_choice = tc["function"]["name"]
    elif isinstance(tc, str):
        s.tool_choice = tc
    th = body.get("thinking") or {}
    if th.get("type") == "enabled":
        s.thinking_budget = th.get("budget_tokens")
    elif body.get("reasoning_effort") in EFFORTS:
        s.thinking_budget = EFFORTS[body["reasoning_effort"]]
    rf = body.get("response_format") or {}
    if rf.get("type") == "json_schema":
        s.json_schema = rf["json_schema"]["schema"]
    elif rf.get("type") == "json_object":
        s.json_schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    s.max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    return s


def _usage(r: Reply, mode: str) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens,
                         "total_tokens": r.prompt_tokens + r.completion_tokens}
    if mode != "databricks":
        u["prompt_tokens_details"] = {"cached_tokens": 0}
        u["completion_tokens_details"] = {"reasoning_tokens": r.reasoning_tokens}
    return u


def _calls(r: Reply) -> list[dict[str, Any]]:
    return [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, n, a in r.tool_calls]


def _message(r: Reply, mode: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": None if r.tool_calls else r.text,
                           "refusal": None}
    if r.tool_calls:
        msg["tool_calls"] = _calls(r)
    if r.reasoning and mode == "databricks":
        blocks: list[dict[str, Any]] = [{"type": "reasoning", "summary": [
            {"type": "summary_text", "text": r.reasoning, "signature": r.signature}]}]
        if r.text:
            blocks.append({"type": "text", "text": r.text})
        msg["content"] = blocks
    elif r.reasoning and mode == "vllm":
        msg["reasoning_content"] = r.reasoning
    return msg


def _error(fail: str, mode: str) -> Response:
    status, kind, code, message = _ERRORS[fail]
    headers = {"Retry-After": "7"} if status == 429 else {}
    if mode == "databricks":
        return JSONResponse({"error_code": _DBX_CODES[status], "message": message}, status,
                            headers=headers)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status, headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


async def _events(r: Reply, body: dict[str, Any], mode: str) -> AsyncIterator[bytes]:
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model"), "system_fingerprint": "fp_fake"}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    sent = {"completion_tokens": 0}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        c: dict[str, Any] = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
        if mode == "databricks":
            sent["completion_tokens"] += 1
            done = finish is not None
            c["usage"] = {"prompt_tokens": r.prompt_tokens,
                          "completion_tokens": r.completion_tokens if done
                          else sent["completion_tokens"],
                          "total_tokens": r.prompt_tokens + (r.completion_tokens if done
                                                             else sent["completion_tokens"])}
        elif include_usage:
            c["usage"] = None
        return _sse(c)

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    if r.fail == "reset":
        raise ConnectionResetError("fake provider: connection reset")
    if r.fail == "midstream":
        yield _sse({"error": {"message": "The server had an error while processing your "
                              "request.", "type": "server_error", "param": None, "code": None}})
        return
    if r.reasoning and mode == "databricks":
        yield chunk({"content": [{"type": "reasoning", "summary": [
            {"type": "summary_text", "text": r.reasoning, "signature": r.signature}]}]})
    elif r.reasoning and mode == "vllm":
        yield chunk({"reasoning_content": r.reasoning})
    for piece in pieces(r.text):
        yield chunk({"content": piece})
    for i, (cid, name, args) in enumerate(r.tool_calls):
        yield chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                     "function": {"name": name, "arguments": ""}}]})
        for piece in pieces(json.dumps(args)):
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
    yield chunk({}, r.finish)
    if include_usage and mode != "databricks":
        yield _sse({**head, "choices": [], "usage": _usage(r, mode)})
    if r.fail != "nodone":
        yield b"data: [DONE]\n\n"


def _reply(seen: Seen) -> Reply:
    r = think(seen)
    if r.fail == "badjson":
        r.text, r.tool_calls, r.finish = "this is not JSON", [], "stop"
    return r


def fake() -> FakeServer:
    """The fake OpenAI-compatible server (not started)."""
    server: FakeServer
    tokens = {"n": 0}

    async def chat(request: Request) -> Response:
        rec = await server.record(request)
        mode = _mode(request)
        if mode == "azure" and "api-version" not in rec.query:
            return JSONResponse({"error": {"code": "404", "message": "Resource not found"}}, 404)
        body = rec.json()
        r = _reply(seen_of(body))
        if r.fail == "timeout":
            await sleep_forever()
        if r.fail in _ERRORS:
            return _error(r.fail, mode)
        if body.get("stream"):
            return StreamingResponse(_events(r, body, mode), media_type="text/event-stream")
        return JSONResponse({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "system_fingerprint": "fp_fake",
            "choices": [{"index": i, "message": _message(r, mode), "logprobs": None,
                         "finish_reason": r.finish} for i in range(body.get("n") or 1)],
            "usage": _usage(r, mode)})

    async def completions(request: Request) -> Response:
        rec = await server.record(request)
        body = rec.json()
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        replies = [_reply(Seen(turns=[{"role": "user", "text": p}])) for p in prompts]
        if replies[0].fail in _ERRORS:
            return _error(str(replies[0].fail), _mode(request))
        head = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model")}
        usage = {"prompt_tokens": sum(r.prompt_tokens for r in replies),
                 "completion_tokens": sum(r.completion_tokens for r in replies)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            return JSONResponse({**head, "choices": [
                {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish}
                for i, r in enumerate(replies)], "usage": usage})

        async def events() -> AsyncIterator[bytes]:
            for piece in pieces(replies[0].text):
                yield _sse({**head, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                                 "finish_reason": None}]})
            yield _sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": replies[0].finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({**head, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        rec = await server.record(request)
        body = rec.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        fail = next((_reply(Seen(turns=[{"role": "user", "text": t}])).fail for t in texts), None)
        if fail in _ERRORS:
            return _error(str(fail), _mode(request))
        data = []
        for i, t in enumerate(texts):
            vec = vector(t)
            emb: Any = vec
            if body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(max(1, len(t) // 4) for t in texts)
        return JSONResponse({"object": "list", "data": data, "model": body.get("model"),
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def token(request: Request) -> Response:
        rec = await server.record(request)
        form = dict(parse_qsl(rec.body.decode()))
        if form.get("grant_type") != "client_credentials" or not form.get("client_secret"):
            return JSONResponse({"error": "invalid_request",
                                 "error_description": "AADSTS900144: bad request"}, 400)
        tokens["n"] += 1
        return JSONResponse({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                             "access_token": f"entra-token-{tokens['n']}"})

    routes = []
    for prefix in ("/v1", "/vllm/v1", "/openai/deployments/{deployment}", "/serving-endpoints"):
        routes += [Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
                   Route(f"{prefix}/completions", completions, methods=["POST"]),
                   Route(f"{prefix}/embeddings", embeddings, methods=["POST"])]
    routes.append(Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"]))
    server = FakeServer(routes)
    return server


def _mode(request: Request) -> str:
    path = request.url.path
    if path.startswith("/serving-endpoints"):
        return "databricks"
    if path.startswith("/vllm"):
        return "vllm"
    if path.startswith("/openai/deployments"):
        return "azure"
    return "openai"


def vector(text: str, dims: int = 8) -> list[float]:
    """The fake embedding of ``text``: ``dims`` floats in [-1, 1) from its SHA-256."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 128 - 1, 4) for b in digest[:dims]]


def external_model(url: str, task: str = "llm/v1/chat", name: str = "gpt-4o-mini") -> dict:
    """An ``openai`` external model pointing at the fake (plaintext key)."""
    return {"provider": "openai", "name": name, "task": task,
            "openai_config": {"openai_api_key_plaintext": API_KEY,
                              "openai_api_base": f"{url}/v1"}}
