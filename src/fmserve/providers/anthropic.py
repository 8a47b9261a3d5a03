"""Provider ``anthropic``: the Anthropic Messages API (``POST {base}/v1/messages``).

Wire format: https://docs.anthropic.com/en/api/messages (request/response),
https://docs.anthropic.com/en/docs/build-with-claude/streaming (SSE events),
https://docs.anthropic.com/en/api/errors (error bodies).

Config (spec §2.4 ``anthropic_config``)::

    {"anthropic_api_key": "{{secrets/scope/key}}"}   # or "anthropic_api_key_plaintext"
    {"anthropic_api_base": "http://127.0.0.1:9000"}  # fmserve extension, default
                                                     # https://api.anthropic.com

Headers sent: ``x-api-key``, ``anthropic-version: 2023-06-01``, ``content-type``.

Request translation (OpenAI/Databricks chat → Messages):

* ``system``/``developer`` messages → top-level ``system`` (joined by blank lines);
  consecutive same-role turns are merged; ``role: tool`` messages → one user turn of
  ``tool_result`` blocks (first in that turn); assistant ``tool_calls`` → ``tool_use``
  blocks (``input`` = parsed arguments). Empty or whitespace-only text is never sent
  (Anthropic rejects empty text blocks), nor are empty turns.
* prior ``reasoning`` items → ``thinking`` blocks with their signature, first in the
  assistant turn; ``summary_encrypted_text`` → ``redacted_thinking``. Reasoning without a
  signature (e.g. produced by another provider) cannot be verified by Anthropic and is
  dropped.
* ``tools`` → ``{name, description, input_schema}``; ``tool_choice`` auto/required/named/
  none → ``auto``/``any``/``tool``/``none``; ``parallel_tool_calls: false`` →
  ``disable_parallel_tool_use: true``.
* ``thinking``/``reasoning_effort`` → ``thinking: {type: enabled, budget_tokens}``
  (:func:`~fmserve.providers.common.thinking_budget`). ``max_tokens`` is required by
  Anthropic: default 4096 tokens, or budget + 4096 with thinking. With thinking,
  forced tools, ``response_format``, ``top_k``, ``temperature`` ≠ 1 and ``top_p`` < 0.95
  are a 400 (Anthropic's extended-thinking rules).
* ``response_format`` json_schema/json_object → a forced tool named after the schema;
  its ``input`` becomes the text answer (validated with ``check_structured``). A
  non-object root schema is wrapped in ``{"value": ...}`` and unwrapped again.
* images → ``{"type": "image", "source": {"type": "base64", "media_type", "data"}}``;
  ``stop`` → ``stop_sequences``; ``top_k`` and ``user`` (→ ``metadata.user_id``)
  supported; ``temperature`` must be 0–1; ``n`` > 1 by concurrent calls (not streamed);
  ``extra_params`` merged verbatim into the body.

Answer translation: ``text`` → text; ``thinking`` → reasoning items with signature;
``redacted_thinking`` → ``summary_encrypted_text``; ``tool_use`` → tool calls.
``stop_reason`` end_turn/stop_sequence → ``stop``, max_tokens → ``length``, tool_use →
``tool_calls``, refusal → ``content_filter``. Usage: ``input_tokens`` (+ cache read and
creation) → ``prompt_tokens``, ``output_tokens`` → ``completion_tokens``. Anthropic does
not report thinking tokens separately: ``reasoning_tokens`` is an *estimate*, the
thinking text length / 4.

Errors: ``{"type": "error", "error": {"type", "message"}}`` bodies map through
:func:`~fmserve.providers.upstream.provider_error` (529 ``overloaded_error`` → 503); an
``event: error`` mid-stream raises the same mapped error (sent as a final error event).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aiohttp
import orjson

from fmserve.errors import BadGateway, FmserveError, InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.protocol.responses import estimate_reasoning_tokens
from fmserve.providers.base import Body, ExternalBackend, ProviderContext
from fmserve.providers.common import (
    Answer,
    ChunkWriter,
    Reasoning,
    chat_answer,
    check_structured,
    parts,
    reasoning_of,
    response_schema,
    thinking_budget,
    tool_arguments,
    tool_call,
    tool_choice_of,
    tools_of,
    usage,
)
from fmserve.providers.images import Images
from fmserve.providers.upstream import provider_error, sse_events

API_VERSION = "2023-06-01"
DEFAULT_BASE = "https://api.anthropic.com"
DEFAULT_MAX_TOKENS = 4096
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter"}
# Anthropic error type → HTTP status (for errors inside a stream).
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                "billing_error": 402, "permission_error": 403, "not_found_error": 404,
                "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                "overloaded_error": 529, "timeout_error": 504}
_ID_BAD = re.compile(r"[^a-zA-Z0-9_-]")


def _tool_id(call_id: str) -> str:
    """A tool-use id Anthropic accepts (``^[a-zA-Z0-9_-]+$``), mapped the same everywhere."""
    return _ID_BAD.sub("_", call_id)


class ResponseTool:
    """The forced tool standing in for ``response_format`` (None fields: no such tool)."""

    def __init__(self, name: str | None = None, wrapped: bool = False) -> None:
        self.name, self.wrapped = name, wrapped

    def text(self, value: Any) -> str:
        if self.wrapped and isinstance(value, dict):
            value = value.get("value")
        return json.dumps(value)


def _blocks_user(mi: int, msg: Any, images: Images) -> list[Body]:
    out: list[Body] = []
    for pi, p in enumerate(parts(msg)):
        kind = p.get("type")
        if kind == "text":
            if (p.get("text") or "").strip():
                out.append({"type": "text", "text": p["text"]})
        elif kind in ("image_url", "image"):
            img = images.get(mi, pi)
            out.append({"type": "image", "source": {"type": "base64",
                                                    "media_type": img.media_type,
                                                    "data": img.b64()}})
        else:
            raise InvalidParameterValue(f"messages[{mi}].content[{pi}]: content type "
                                        f"'{kind}' is not supported in a {msg.role} message")
    return out


def _blocks_assistant(mi: int, msg: Any) -> list[Body]:
    out: list[Body] = []
    for r in reasoning_of(msg):
        if r.encrypted:
            out.append({"type": "redacted_thinking", "data": r.encrypted})
        elif r.signature:
            out.append({"type": "thinking", "thinking": r.text, "signature": r.signature})
    for p in parts(msg):
        if p.get("type") == "text" and (p.get("text") or "").strip():
            out.append({"type": "text", "text": p["text"]})
    for call in msg.tool_calls or []:
        fn = call.get("function") or {}
        if not call.get("id") or not fn.get("name"):
            raise InvalidParameterValue(f"messages[{mi}].tool_calls: each call needs an id "
                                        f"and function.name")
        out.append({"type": "tool_use", "id": _tool_id(str(call["id"])), "name": fn["name"],
                    "input": tool_arguments(call)})
    return out


def _order(role: str, blocks: list[Body]) -> list[Body]:
    """tool_result blocks first in a user turn, thinking blocks first in an assistant turn."""
    first = ("tool_result",) if role == "user" else ("thinking", "redacted_thinking")
    return sorted(blocks, key=lambda b: b["type"] not in first)


def to_messages(req: ChatCompletionRequest, images: Images) -> tuple[str, list[Body]]:
    """``(system, messages)`` in Anthropic's shape (see the module docstring).

    Raises:
        InvalidParameterValue: a tool message without ``tool_call_id``, a malformed tool
            call, an unsupported content type, or nothing left to send.
    """
    system: list[str] = []
    turns: list[Body] = []
    for mi, msg in enumerate(req.messages):
        if msg.role in ("system", "developer"):
            if msg.text().strip():
                system.append(msg.text())
            continue
        if msg.role == "tool":
            if not msg.tool_call_id:
                raise InvalidParameterValue(f"messages[{mi}]: a tool message needs tool_call_id")
            block: Body = {"type": "tool_result", "tool_use_id": _tool_id(msg.tool_call_id)}
            if msg.text().strip():
                block["content"] = msg.text()
            role, blocks = "user", [block]
        elif msg.role == "user":
            role, blocks = "user", _blocks_user(mi, msg, images)
        else:
            role, blocks = "assistant", _blocks_assistant(mi, msg)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _order(role, turns[-1]["content"] + blocks)
        else:
            turns.append({"role": role, "content": _order(role, blocks)})
    if not turns:
        raise InvalidParameterValue("messages: at least one non-empty user or assistant "
                                    "message is required")
    last = turns[-1]
    if last["role"] == "assistant" and last["content"][-1]["type"] == "text":
        # Anthropic rejects a final (prefill) assistant turn ending in whitespace.
        last["content"][-1]["text"] = last["content"][-1]["text"].rstrip()
    return "\n\n".join(system), turns


def _check_thinking(req: ChatCompletionRequest, forced: bool, structured: bool) -> None:
    why = ("a forced tool_choice (required or a named function)" if forced else
           "response_format (fmserve implements it with a forced tool)" if structured else
           "top_k" if req.top_k is not None else
           "temperature other than 1" if req.temperature not in (None, 1) else
           "top_p below 0.95" if req.top_p is not None and req.top_p < 0.95 else None)
    if why:
        raise InvalidParameterValue(f"Anthropic extended thinking cannot be combined with "
                                    f"{why}; drop one of them.")


def to_anthropic(req: ChatCompletionRequest, model: str,
                 images: Images) -> tuple[Body, ResponseTool]:
    """The Messages request body for ``req`` and the response-format tool it uses.

    Raises:
        InvalidParameterValue: bad tools/tool_choice/thinking/response_format, or a
            combination Anthropic forbids.
    """
    tools = tools_of(req)
    choice = tool_choice_of(req, tools)
    kind, schema, rname = response_schema(req)
    max_tokens = req.effective_max_tokens()
    budget = thinking_budget(req, max_tokens)
    if budget is not None and req.thinking is None and max_tokens is not None:
        if max_tokens <= 1024:
            raise InvalidParameterValue(f"reasoning_effort needs max_tokens above 1024 on "
                                        f"Anthropic models, got {max_tokens}")
        budget = min(budget, max_tokens - 1)
    if req.temperature is not None and req.temperature > 1:
        raise InvalidParameterValue(f"temperature must be between 0 and 1 for Anthropic "
                                    f"models, got {req.temperature}")
    system, messages = to_messages(req, images)
    body: Body = {"model": model, "messages": messages,
                  "max_tokens": max_tokens or DEFAULT_MAX_TOKENS + (budget or 0)}
    if system:
        body["system"] = system
    specs: list[Body] = [{"name": t.name, "description": t.description,
                          "input_schema": t.parameters} for t in tools]
    for s in specs:
        if not s["description"]:
            del s["description"]
    rtool = ResponseTool()
    if kind != "text":
        root = schema if schema is not None else {"type": "object"}
        rtool.wrapped = root.get("type") != "object"
        if rtool.wrapped:
            root = {"type": "object", "properties": {"value": root}, "required": ["value"]}
        rtool.name = (_ID_BAD.sub("_", rname)[:64] or "response")
        while rtool.name in {t.name for t in tools}:
            rtool.name = rtool.name[:55] + "_response"
        specs.append({"name": rtool.name, "input_schema": root,
                      "description": "Give your final answer by calling this tool; its input "
                                     "must match the schema."})
        if choice is None or (choice == "auto" and not tools):
            choice = rtool.name
    if budget is not None:
        _check_thinking(req, choice not in (None, "auto", "none"), kind != "text")
        body["thinking"] = ({"type": "adaptive"} if (req.thinking or {}).get("type") ==
                            "adaptive" else {"type": "enabled", "budget_tokens": budget})
    if specs:
        body["tools"] = specs
    tc: Body | None = None
    if choice in ("auto", "none"):
        tc = {"type": choice}
    elif choice == "required":
        tc = {"type": "any"}
    elif choice is not None:
        tc = {"type": "tool", "name": choice}
    if req.parallel_tool_calls is False and specs:
        tc = {**(tc or {"type": "auto"}), "disable_parallel_tool_use": True}
    if tc is not None and specs:
        body["tool_choice"] = tc
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k"), ("stop", "stop_sequences")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    user = (req.model_extra or {}).get("user")
    if user:
        body["metadata"] = {"user_id": str(user)}
    body.update(ExternalBackend.extra_params(req))
    return body, rtool


def _prompt_tokens(u: dict[str, Any]) -> int:
    return sum(int(u.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens",
                                             "cache_creation_input_tokens"))


def from_anthropic(data: Body, rtool: ResponseTool) -> tuple[Answer, dict[str, int]]:
    """One :class:`Answer` and the usage of a Messages response body.

    Raises:
        BadGateway: a body without ``content``.
    """
    if not isinstance(data.get("content"), list):
        raise BadGateway(f"anthropic answered without content: {str(data)[:200]}")
    ans, structured, thinking_chars = Answer(), None, 0
    for block in data["content"]:
        kind = block.get("type")
        if kind == "text":
            ans.text += block.get("text") or ""
        elif kind == "thinking":
            thinking_chars += len(block.get("thinking") or "")
            ans.reasoning.append(Reasoning(block.get("thinking") or "", block.get("signature")))
        elif kind == "redacted_thinking":
            ans.reasoning.append(Reasoning(encrypted=block.get("data")))
        elif kind == "tool_use" and block.get("name") == rtool.name:
            structured = rtool.text(block.get("input") or {})
        elif kind == "tool_use":
            ans.tool_calls.append(tool_call(block["id"], block["name"], block.get("input") or {}))
    if structured is not None:
        ans.text = structured
    reason = STOP_REASONS.get(str(data.get("stop_reason")), "stop")
    ans.finish_reason = "tool_calls" if ans.tool_calls else (
        "stop" if reason == "tool_calls" else reason)
    u = data.get("usage") or {}
    return ans, usage(_prompt_tokens(u), int(u.get("output_tokens") or 0),
                      estimate_reasoning_tokens(thinking_chars) or None)


def stream_error(data: str) -> FmserveError:
    """The mapped error for an ``event: error`` payload."""
    try:
        kind = (orjson.loads(data).get("error") or {}).get("type")
    except (orjson.JSONDecodeError, AttributeError):
        kind = None
    return provider_error("anthropic", ERROR_STATUS.get(str(kind), 502), data)


class AnthropicBackend(ExternalBackend):
    """Chat (and completions mapped onto chat) through the Anthropic Messages API."""

    provider: ClassVar[str] = "anthropic"
    supported_params: ClassVar[frozenset[str]] = frozenset({"top_k", "user"})

    def check_config(self) -> None:
        if self.task == "llm/v1/embeddings":
            raise self.config_error("Anthropic has no embeddings API; use llm/v1/chat")
        self.credential("anthropic_api_key")
        base = str(self.option("anthropic_api_base", DEFAULT_BASE)).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise self.config_error(f"anthropic_api_base must be an http(s) URL, got '{base}'")
        self.url = base.removesuffix("/v1") + "/v1/messages"

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.credential("anthropic_api_key") or "",
                "anthropic-version": API_VERSION}

    async def _prepare(self, req: ChatCompletionRequest) -> tuple[Body, ResponseTool]:
        self.reject_unsupported(req)
        images = await self.load_images(req)
        return to_anthropic(req, self.model, images)

    async def chat(self, req: ChatCompletionRequest) -> Body:
        body, rtool = await self._prepare(req)

        async def once(_: ChatCompletionRequest) -> Body:
            ans, u = from_anthropic(await self.upstream.send(self.url, body, self._headers()),
                                    rtool)
            check_structured(ans.text, req)
            return chat_answer([ans], u)

        return await self.chat_n(req, once)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        if req.n != 1:
            raise InvalidParameterValue("Streaming from an Anthropic model takes n = 1.")
        body, rtool = await self._prepare(req)
        async for chunk in self.upstream.stream(self.url, {**body, "stream": True},
                                                self._headers(),
                                                lambda resp: self._chunks(resp, req, rtool)):
            yield chunk

    async def _chunks(self, resp: aiohttp.ClientResponse, req: ChatCompletionRequest,
                      rtool: ResponseTool) -> AsyncIterator[Body]:
        """Chat chunks from the Messages SSE events (see the streaming doc linked above)."""
        w, kinds, args_sent = ChunkWriter(), {}, set()
        thinking_chars, stop, wrapped_json = 0, None, ""
        async for event, data in sse_events(resp):
            if event == "error":
                raise stream_error(data)
            ev = orjson.loads(data)
            kind = ev.get("type", event)
            i = ev.get("index")
            if kind == "message_start":
                u = (ev.get("message") or {}).get("usage") or {}
                w.prompt_tokens = _prompt_tokens(u)
                w.completion_tokens = int(u.get("output_tokens") or 0)
                yield w.start()
            elif kind == "content_block_start":
                cb = ev.get("content_block") or {}
                kinds[i] = cb.get("type")
                if cb.get("type") == "text" and cb.get("text"):
                    yield w.text_delta(cb["text"])
                elif cb.get("type") == "redacted_thinking":
                    yield w.reasoning_delta(encrypted=cb.get("data"))
                elif cb.get("type") == "tool_use" and cb.get("name") == rtool.name:
                    kinds[i] = "response"
                elif cb.get("type") == "tool_use":
                    yield w.tool_start(i, cb["id"], cb["name"])
            elif kind == "content_block_delta":
                d = ev.get("delta") or {}
                dt = d.get("type")
                if dt == "text_delta" and d.get("text"):
                    yield w.text_delta(d["text"])
                elif dt == "thinking_delta" and d.get("thinking"):
                    thinking_chars += len(d["thinking"])
                    w.reasoning_tokens = estimate_reasoning_tokens(thinking_chars)
                    yield w.reasoning_delta(d["thinking"])
                elif dt == "signature_delta":
                    yield w.reasoning_delta("", signature=d.get("signature"))
                elif dt == "input_json_delta" and d.get("partial_json"):
                    args_sent.add(i)
                    if kinds.get(i) == "response" and rtool.wrapped:
                        wrapped_json += d["partial_json"]  # unwrapped at the block's end
                    elif kinds.get(i) == "response":
                        yield w.text_delta(d["partial_json"])
                    else:
                        yield w.tool_args(i, d["partial_json"])
            elif kind == "content_block_stop":
                if kinds.get(i) == "tool_use" and i not in args_sent:
                    yield w.tool_args(i, "{}")
                elif kinds.get(i) == "response" and (rtool.wrapped or i not in args_sent):
                    try:
                        text = rtool.text(json.loads(wrapped_json or "{}"))
                    except ValueError:
                        text = wrapped_json
                    yield w.text_delta(text)
            elif kind == "message_delta":
                stop = (ev.get("delta") or {}).get("stop_reason") or stop
                u = ev.get("usage") or {}
                if u.get("output_tokens") is not None:
                    w.completion_tokens = int(u["output_tokens"])
                if u.get("input_tokens") is not None:
                    w.prompt_tokens = _prompt_tokens(u)
            elif kind == "message_stop":
                check_structured(w.text, req)
                reason = STOP_REASONS.get(str(stop), "stop")
                yield w.finish("stop" if reason == "tool_calls" else reason)
                return
        raise BadGateway("The stream from anthropic ended before message_stop.")


def create(name: str, model: ExternalModelInput, ctx: ProviderContext) -> ExternalBackend:
    return AnthropicBackend(name, model, ctx)
