"""A fake Anthropic Messages API (``POST /v1/messages``) on top of :func:`brain.think`.

Speaks the real wire format (https://docs.anthropic.com/en/api/messages,
.../build-with-claude/streaming, .../api/errors): ``x-api-key`` + ``anthropic-version``
headers, ``message`` answers with ``text``/``thinking``/``tool_use`` blocks, SSE
``message_start`` … ``message_stop`` with ``ping``, and ``{"type": "error", "error":
{"type", "message"}}`` bodies (429 with ``retry-after``, 529 overloaded).

It rejects, with Anthropic's 400 body, what Anthropic rejects, so tests prove fmserve
never sends it: empty/whitespace text blocks, roles other than user/assistant, a
``tool_result`` whose ``tool_use`` is not in the previous assistant turn (or not first
in its turn), a ``tool_use`` not answered in the next turn, a thinking block without a
valid signature (or not first in its turn), thinking with a forced tool_choice, a
budget ≥ ``max_tokens``, missing ``max_tokens``, a bad image source.

Extra triggers beyond the brain's: ``FAIL:overloaded`` → 529 (stream: an ``event: error``
after ``message_start``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fakes.brain import Reply, Seen, pieces, think
from fakes.server import FakeServer, sleep_forever

API_KEY = "sk-ant-fake-0123456789abcdef"
MODEL = "claude-sonnet-4-5"
MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
FAILS = {"400": (400, "invalid_request_error", "messages: simulated bad request"),
         "401": (401, "authentication_error", "invalid x-api-key"),
         "429": (429, "rate_limit_error", "Number of request tokens has exceeded your "
                                          "per-minute rate limit"),
         "500": (500, "api_error", "Internal server error"),
         "overloaded": (529, "overloaded_error", "Overloaded")}


class Rejected(Exception):
    def __init__(self, message: str, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None
          ) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message},
                         "request_id": "req_011CfakeAnthropic"},
                        status_code=status, headers=headers)


def _check_text(where: str, block: dict[str, Any]) -> None:
    text = block.get("text")
    if not isinstance(text, str) or not text:
        raise Rejected(f"{where}: text content blocks must be non-empty")
    if not text.strip():
        raise Rejected(f"{where}: text content blocks must contain non-whitespace text")


def read(body: dict[str, Any], signatures: dict[str, str]) -> Seen:
    """Validate a Messages request like Anthropic does and turn it into a :class:`Seen`.

    ``signatures`` maps each thinking signature this fake issued to its thinking text.
    """
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            raise Rejected(f"{field}: Field required")
    seen = Seen(max_tokens=body["max_tokens"])
    system = body.get("system") or ""
    if isinstance(system, list):
        for i, b in enumerate(system):
            _check_text(f"system.{i}", b)
        system = "".join(b["text"] for b in system)
    seen.system = system
    thinking = body.get("thinking") or {}
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise Rejected("thinking.enabled.budget_tokens: Input should be greater than or "
                           "equal to 1024")
        if budget >= body["max_tokens"]:
            raise Rejected("`max_tokens` must be greater than `thinking.budget_tokens`")
        seen.thinking_budget = budget
    elif thinking.get("type") == "adaptive":
        seen.thinking_budget = 4096
    for t in body.get("tools") or []:
        if not t.get("name") or (t.get("input_schema") or {}).get("type") != "object":
            raise Rejected("tools.0.custom.input_schema.type: Input should be 'object'")
        seen.tools.append({"name": t["name"], "parameters": t["input_schema"]})
    tc = body.get("tool_choice") or {"type": "auto"}
    seen.tool_choice = {"auto": "auto", "none": "none", "any": "required"}.get(
        tc.get("type"), tc.get("name") or "auto")
    if tc.get("type") == "tool" and tc.get("name") not in {t["name"] for t in seen.tools}:
        raise Rejected(f"tool_choice.name: tool '{tc.get('name')}' not found in tools")
    if seen.thinking_budget and tc.get("type") in ("any", "tool"):
        raise Rejected("Thinking may not be enabled when tool_choice forces tool use.")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise Rejected("messages: at least one message is required")
    prev_uses: set[str] = set()
    for mi, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise Rejected(f"messages.{mi}.role: Input should be 'user' or 'assistant'")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not content:
            raise Rejected(f"messages.{mi}: all messages must have non-empty content except "
                           f"for the optional final assistant message")
        turn: dict[str, Any] = {"role": role, "text": "", "images": 0, "tool_calls": [],
                                "tool_result": None, "reasoning": []}
        uses: set[str] = set()
        results: set[str] = set()
        seen_other = False
        for bi, b in enumerate(content):
            where, kind = f"messages.{mi}.content.{bi}", b.get("type")
            if kind == "text":
                _check_text(where, b)
                turn["text"] += b["text"]
                seen_other = True
            elif kind == "image" and role == "user":
                src = b.get("source") or {}
                if src.get("type") != "base64" or src.get("media_type") not in MEDIA_TYPES:
                    raise Rejected(f"{where}.image.source: invalid image source")
                base64.b64decode(src.get("data") or "", validate=True)
                turn["images"] += 1
                seen_other = True
            elif kind == "tool_result" and role == "user":
                if b.get("tool_use_id") not in prev_uses:
                    raise Rejected(f"{where}: unexpected `tool_use_id` found in `tool_result` "
                                   f"blocks: {b.get('tool_use_id')}. Each `tool_result` block "
                                   f"must have a corresponding `tool_use` block in the "
                                   f"previous message.")
                if seen_other:
                    raise Rejected(f"{where}: tool_result blocks must come first in the "
                                   f"user message")
                results.add(b["tool_use_id"])
                c = b.get("content", "")
                if isinstance(c, list):
                    for ci, cb in enumerate(c):
                        _check_text(f"{where}.content.{ci}", cb)
                    c = "".join(cb["text"] for cb in c)
                seen.turns.append({"role": "tool", "text": "", "tool_result": c})
            elif kind == "tool_use" and role == "assistant":
                if not b.get("id") or not b.get("name") or not isinstance(b.get("input"), dict):
                    raise Rejected(f"{where}.tool_use: id, name and an object input required")
                uses.add(b["id"])
                turn["tool_calls"].append(b["name"])
                seen_other = True
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                if seen_other:
                    raise Rejected(f"{where}: thinking blocks must come first in an "
                                   f"assistant message")
                if kind == "thinking":
                    sig = b.get("signature")
                    if not sig:
                        raise Rejected(f"{where}.thinking.signature: Field required")
                    if signatures.get(sig) != b.get("thinking"):
                        raise Rejected(f"{where}: Invalid `signature` in `thinking` block")
                    turn["reasoning"].append((b["thinking"], sig))
            else:
                raise Rejected(f"{where}: block type '{kind}' is not allowed in a {role} "
                               f"message")
        if prev_uses - results and mi > 0:
            raise Rejected(f"messages.{mi}: `tool_use` ids were found without `tool_result` "
                           f"blocks immediately after: {sorted(prev_uses - results)}")
        prev_uses = uses
        if role == "assistant" or turn["text"] or turn["images"]:
            seen.turns.append(turn)
    return seen


def _blocks(reply: Reply) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if reply.reasoning is not None:
        out.append({"type": "thinking", "thinking": reply.reasoning,
                    "signature": reply.signature})
    if reply.text:
        out.append({"type": "text", "text": reply.text})
    for cid, name, args in reply.tool_calls:
        out.append({"type": "tool_use", "id": "toolu_" + cid[5:], "name": name, "input": args})
    return out


def _stop(reply: Reply, stops: list[str]) -> tuple[str, str | None]:
    for s in stops:
        if s in reply.text:
            reply.text = reply.text[:reply.text.index(s)]
            return "stop_sequence", s
    return {"stop": "end_turn", "length": "max_tokens",
            "tool_calls": "tool_use"}[reply.finish], None


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(reply: Reply, message: dict[str, Any]) -> AsyncIterator[bytes]:
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1}}
    yield _sse("message_start", {"type": "message_start", "message": start})
    if reply.fail == "reset":
        raise ConnectionResetError("simulated reset")
    if reply.fail == "overloaded":
        yield _sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "Overloaded"}})
        return
    yield _sse("ping", {"type": "ping"})
    for i, b in enumerate(message["content"]):
        empty = {"text": {"type": "text", "text": ""},
                 "thinking": {"type": "thinking", "thinking": ""},
                 "tool_use": {**b, "input": {}}}[b["type"]]
        yield _sse("content_block_start", {"type": "content_block_start", "index": i,
                                           "content_block": empty})
        if b["type"] == "text":
            deltas = [{"type": "text_delta", "text": p} for p in pieces(b["text"])]
        elif b["type"] == "thinking":
            deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces(b["thinking"])]
            deltas.append({"type": "signature_delta", "signature": b["signature"]})
        else:
            deltas = [{"type": "input_json_delta", "partial_json": p}
                      for p in ["", *pieces(json.dumps(b["input"]))]]
        for d in deltas:
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                               "delta": d})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": i})
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": message["stop_reason"],
                                           "stop_sequence": message["stop_sequence"]},
                                 "usage": {"output_tokens": reply.completion_tokens}})
    yield _sse("message_stop", {"type": "message_stop"})


def fake() -> FakeServer:
    """The fake Anthropic API (not started); every request is recorded."""
    signatures: dict[str, str] = {}

    async def messages(request: Request) -> Response:
        await server.record(request)
        if request.headers.get("x-api-key") != API_KEY:
            return error(401, "authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != "2023-06-01":
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = json.loads(await request.body())
            seen = read(body, signatures)
        except Rejected as exc:
            return error(exc.status, exc.kind, str(exc))
        except ValueError as exc:
            return error(400, "invalid_request_error", f"invalid request body: {exc}")
        reply = think(seen)
        if reply.fail == "timeout":
            await sleep_forever()
        if reply.fail in FAILS and not (body.get("stream") and reply.fail == "overloaded"):
            status, kind, msg = FAILS[reply.fail]
            return error(status, kind, msg, {"retry-after": "7"} if status == 429 else None)
        if reply.reasoning is not None and reply.signature:
            signatures[reply.signature] = reply.reasoning
        stop, seq = _stop(reply, body.get("stop_sequences") or [])
        msg_id = "msg_" + hashlib.sha1(json.dumps(body).encode()).hexdigest()[:20]
        message = {"id": msg_id, "type": "message", "role": "assistant", "model": body["model"],
                   "content": _blocks(reply), "stop_reason": stop, "stop_sequence": seq,
                   "usage": {"input_tokens": reply.prompt_tokens - 2,
                             "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0,
                             "output_tokens": reply.completion_tokens}}
        if body.get("stream"):
            return StreamingResponse(_events(reply, message), media_type="text/event-stream")
        if reply.fail == "reset":
            async def broken() -> AsyncIterator[bytes]:
                yield b'{"id": "' + msg_id.encode()
                raise ConnectionResetError("simulated reset")
            return StreamingResponse(broken(), media_type="application/json")
        return JSONResponse(message)

    server = FakeServer(routes=[Route("/v1/messages", messages, methods=["POST"])])
    return server


def external_model(url: str, task: str = "llm/v1/chat", name: str = MODEL) -> dict[str, Any]:
    """The ``external_model`` object for :func:`conftest.create_external`."""
    return {"provider": "anthropic", "name": name, "task": task,
            "anthropic_config": {"anthropic_api_key_plaintext": API_KEY,
                                 "anthropic_api_base": url}}
