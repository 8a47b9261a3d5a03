"""A fake Cohere v2 API (``POST /v2/chat``, ``POST /v2/embed``) on :func:`brain.think`.

Speaks Cohere's wire format (https://docs.cohere.com/v2/reference/chat,
/v2/reference/chat-stream, /v2/reference/embed): strict request parsing (unknown fields
and malformed messages are Cohere's ``{"id", "message"}`` 400), ``Authorization: Bearer``
checked against :data:`KEY`, JSON answers with ``usage.billed_units`` / ``usage.tokens``,
and streams as ``text/event-stream`` frames ``event: <type>`` + ``data: {"type": ...}``.
Faults (``FAIL:...`` in the last user text or any embed text): 400/401/429 (with
``Retry-After: 7``)/500 error bodies, ``timeout`` (never answers), ``reset`` (the stream
breaks after ``message-start``).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fakes import brain
from fakes.server import FakeServer, sleep_forever

KEY = "co-fake-key-5c7e1d9a2b"
TEMPLATE_TOKENS = 10  # usage.tokens.input_tokens counts the prompt template too
CHAT_FIELDS = {"model", "messages", "stream", "tools", "strict_tools", "documents",
               "citation_options", "response_format", "safety_mode", "max_tokens",
               "stop_sequences", "temperature", "seed", "frequency_penalty", "presence_penalty",
               "k", "p", "logprobs", "tool_choice", "thinking", "priority"}
EMBED_FIELDS = {"model", "texts", "images", "inputs", "input_type", "embedding_types",
                "output_dimension", "truncate", "max_tokens", "priority"}
INPUT_TYPES = {"search_document", "search_query", "classification", "clustering", "image"}
FINISH = {"stop": "COMPLETE", "length": "MAX_TOKENS", "tool_calls": "TOOL_CALL"}


def external_model(url: str, task: str = "llm/v1/chat",
                   name: str = "command-r-plus-08-2024") -> dict[str, Any]:
    """The ``external_model`` object for an fmserve endpoint served by this fake at ``url``."""
    return {"provider": "cohere", "name": name, "task": task,
            "cohere_config": {"cohere_api_key_plaintext": KEY, "cohere_api_base": url}}


class Invalid(Exception):
    pass


def error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "7"} if status == 429 else None
    return JSONResponse({"id": str(uuid.uuid4()), "message": message}, status_code=status,
                        headers=headers)


FAULTS = {"400": (400, "invalid request: the fake was asked to fail"),
          "401": (401, "invalid api token"),
          "429": (429, "You are using a Trial key, which is limited to 10 API calls / minute."),
          "500": (500, "internal server error, this has been reported to our developers")}


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise Invalid("invalid request: message content must be a string or a list")
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def parse_chat(body: dict[str, Any]) -> brain.Seen:
    """A :class:`brain.Seen` for a ``/v2/chat`` body; :class:`Invalid` as Cohere would."""
    unknown = set(body) - CHAT_FIELDS
    if unknown:
        raise Invalid(f"invalid request: unknown field(s) {sorted(unknown)}")
    if not body.get("model") or not isinstance(body.get("messages"), list):
        raise Invalid("invalid request: model and messages are required")
    seen = brain.Seen(max_tokens=body.get("max_tokens"))
    for m in body["messages"]:
        role = m.get("role")
        if role == "system":
            seen.system += _text(m.get("content"))
        elif role == "user":
            seen.turns.append({"role": "user", "text": _text(m.get("content"))})
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            for call in calls:
                if not isinstance(call["function"]["arguments"], str):
                    raise Invalid("invalid request: tool call arguments must be a string")
            if not calls and not m.get("content"):
                raise Invalid("invalid request: assistant message must have content or "
                              "tool_calls")
            seen.turns.append({"role": "assistant", "text": _text(m.get("content")),
                               "tool_calls": [call["function"]["name"] for call in calls]})
        elif role == "tool":
            if not m.get("tool_call_id"):
                raise Invalid("invalid request: tool message requires tool_call_id")
            seen.turns.append({"role": "tool", "tool_result": _text(m.get("content"))})
        else:
            raise Invalid(f"invalid request: unknown role '{role}'")
    for t in body.get("tools") or []:
        if t.get("type") != "function":
            raise Invalid("invalid request: tools must be of type function")
        seen.tools.append({"name": t["function"]["name"],
                           "parameters": t["function"].get("parameters") or {}})
    tc = body.get("tool_choice")
    if tc is not None:
        if tc not in ("REQUIRED", "NONE") or not seen.tools:
            raise Invalid("invalid request: tool_choice must be REQUIRED or NONE, with tools")
        seen.tool_choice = tc.lower()
    rf = body.get("response_format")
    if rf is not None:
        if rf.get("type") == "json_object":
            seen.json_schema = rf.get("json_schema") or {
                "type": "object", "properties": {"answer": {"type": "string"}}}
        elif rf.get("type") != "text":
            raise Invalid("invalid request: response_format.type must be text or json_object")
    return seen


def usage(r: brain.Reply) -> dict[str, Any]:
    return {"billed_units": {"input_tokens": r.prompt_tokens,
                             "output_tokens": r.completion_tokens},
            "tokens": {"input_tokens": r.prompt_tokens + TEMPLATE_TOKENS,
                       "output_tokens": r.completion_tokens}}


def _calls(r: brain.Reply) -> list[dict[str, Any]]:
    return [{"id": cid, "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in r.tool_calls]


def answer(r: brain.Reply) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant"}
    if r.tool_calls:
        msg["tool_plan"] = "I will call the tool."
        msg["tool_calls"] = _calls(r)
    else:
        msg["content"] = [{"type": "text", "text": r.text}]
    return {"id": str(uuid.uuid4()), "finish_reason": FINISH[r.finish], "message": msg,
            "usage": usage(r)}


def events(r: brain.Reply) -> list[dict[str, Any]]:
    """The stream events of a reply, in Cohere's order."""
    out: list[dict[str, Any]] = [{"id": str(uuid.uuid4()), "type": "message-start", "delta": {
        "message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [],
                    "citations": []}}}]
    if r.tool_calls:
        for piece in brain.pieces("I will call the tool.", 2):
            out.append({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": piece}}})
        for i, call in enumerate(_calls(r)):
            out.append({"type": "tool-call-start", "index": i, "delta": {"message": {
                "tool_calls": {**call, "function": {**call["function"], "arguments": ""}}}}})
            for piece in brain.pieces(call["function"]["arguments"]):
                out.append({"type": "tool-call-delta", "index": i, "delta": {"message": {
                    "tool_calls": {"function": {"arguments": piece}}}}})
            out.append({"type": "tool-call-end", "index": i})
    else:
        out.append({"type": "content-start", "index": 0,
                    "delta": {"message": {"content": {"type": "text", "text": ""}}}})
        for piece in brain.pieces(r.text):
            out.append({"type": "content-delta", "index": 0,
                        "delta": {"message": {"content": {"text": piece}}}})
        out.append({"type": "content-end", "index": 0})
    out.append({"type": "message-end", "delta": {"finish_reason": FINISH[r.finish],
                                                  "usage": usage(r)}})
    return out


async def _sse(r: brain.Reply) -> AsyncIterator[bytes]:
    for n, ev in enumerate(events(r)):
        yield f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
        if r.fail == "reset" and n == 0:
            raise ConnectionResetError("fake cohere: stream reset")


def _vector(text: str, dims: int) -> list[float]:
    h = hashlib.sha256(text.encode()).digest()
    return [round((h[i % 32] - 128) / 128, 4) for i in range(dims)]


def fake() -> FakeServer:
    """A fake Cohere server (not started)."""
    server: FakeServer

    async def check(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        rec = await server.record(request)
        if rec.headers.get("authorization") != f"Bearer {KEY}":
            return None, error(401, "invalid api token")
        try:
            return rec.json(), None
        except ValueError:
            return None, error(400, "invalid request: body is not JSON")

    async def fault(text: str) -> Response | None:
        m = re.search(r"FAIL:(\w+)", text)
        if not m:
            return None
        if m.group(1) == "timeout":
            await sleep_forever()
        return error(*FAULTS[m.group(1)]) if m.group(1) in FAULTS else None

    async def chat(request: Request) -> Response:
        body, err = await check(request)
        if body is None:
            return err or error(400, "invalid request")
        try:
            seen = parse_chat(body)
        except (Invalid, KeyError, TypeError, AttributeError) as exc:
            return error(400, str(exc) if isinstance(exc, Invalid) else
                         f"invalid request: {exc!r}")
        reply = brain.think(seen)
        failed = await fault(seen.last_user()) if reply.fail != "reset" else None
        if failed is not None:
            return failed
        if body.get("stream"):
            return StreamingResponse(_sse(reply), media_type="text/event-stream")
        return JSONResponse(answer(reply))

    async def embed(request: Request) -> Response:
        body, err = await check(request)
        if body is None:
            return err or error(400, "invalid request")
        unknown = set(body) - EMBED_FIELDS
        if unknown:
            return error(400, f"invalid request: unknown field(s) {sorted(unknown)}")
        texts = body.get("texts")
        if not isinstance(texts, list) or not texts or len(texts) > 96:
            return error(400, "invalid request: texts must be a list of 1 to 96 strings")
        if body.get("input_type") not in INPUT_TYPES:
            return error(400, "invalid request: valid input_type must be provided with the "
                              "provided model")
        if body.get("embedding_types") != ["float"]:
            return error(400, "invalid request: this fake only serves embedding_types float")
        failed = await fault(" ".join(texts))
        if failed is not None:
            return failed
        dims = int(body.get("output_dimension") or 8)
        tokens = sum(max(1, len(t) // 4) for t in texts)
        return JSONResponse({
            "id": str(uuid.uuid4()), "texts": texts,
            "embeddings": {"float": [_vector(t, dims) for t in texts]},
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
            "response_type": "embeddings_by_type"})

    server = FakeServer([Route("/v2/chat", chat, methods=["POST"]),
                         Route("/v2/embed", embed, methods=["POST"])])
    return server
