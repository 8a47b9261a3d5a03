"""Amazon Bedrock wire format: Converse bodies, event-stream frames, Bedrock errors.

Pure translation for :mod:`fmserve.providers.bedrock` (dict in, dict out), after the
bedrock-runtime API reference: Converse request/response
(https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html),
ConverseStream events (``API_runtime_ConverseStream.html``: ``messageStart``,
``contentBlockStart``, ``contentBlockDelta``, ``contentBlockStop``, ``messageStop``,
``metadata``, and ``:message-type exception`` frames) and the error shape
``{"message"}`` + ``x-amzn-ErrorType`` header.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from botocore.eventstream import EventStreamBuffer, ParserError

from fmserve.errors import (
    BadGateway,
    BadRequest,
    DeadlineExceeded,
    FmserveError,
    InvalidParameterValue,
    PermissionDenied,
    RequestLimitExceeded,
    TemporarilyUnavailable,
    Unauthenticated,
)
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.providers import common as c
from fmserve.providers.images import Images
from fmserve.providers.upstream import provider_error, provider_message

Body = dict[str, Any]

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "content_filtered": "content_filter",
                "guardrail_intervened": "content_filter",
                "model_context_window_exceeded": "length"}
# x-amzn-ErrorType / :exception-type (lower-camel in streams) → fmserve error class.
ERROR_TYPES: dict[str, type[FmserveError]] = {
    "throttlingexception": RequestLimitExceeded, "modelnotreadyexception": RequestLimitExceeded,
    "servicequotaexceededexception": RequestLimitExceeded,
    "validationexception": BadRequest, "resourcenotfoundexception": BadRequest,
    "accessdeniedexception": PermissionDenied, "unrecognizedclientexception": Unauthenticated,
    "invalidsignatureexception": PermissionDenied, "expiredtokenexception": Unauthenticated,
    "modeltimeoutexception": DeadlineExceeded, "serviceunavailableexception":
    TemporarilyUnavailable, "internalserverexception": BadGateway,
    "modelstreamerrorexception": BadGateway, "modelerrorexception": BadGateway,
}
STRUCTURED_TOOL = "json_response"


def bedrock_error(status: int, body: bytes | str, headers: Any = None,
                  error_type: str | None = None) -> FmserveError:
    """The fmserve error for a Bedrock error answer (HTTP or an exception stream frame)."""
    etype = error_type or (headers.get("x-amzn-ErrorType", "") if headers is not None else "")
    etype = etype.split(":")[0]
    cls = ERROR_TYPES.get(etype.lower())
    if cls is None:
        return provider_error("amazon-bedrock", status, body, headers)
    msg = f"amazon-bedrock returned {etype} (HTTP {status}): {provider_message(body)}"
    retry = {RequestLimitExceeded: 1, TemporarilyUnavailable: 5}.get(cls)
    if retry is not None and headers is not None and headers.get("retry-after"):
        retry = max(1, int(float(headers["retry-after"]) + 0.999))
    return cls(msg, retry_after=retry)


# -- request translation -------------------------------------------------------------------
def _tool_result(msg: Any) -> Body:
    text = msg.text()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    block = {"json": value} if isinstance(value, dict) else {"text": text}
    return {"toolResult": {"toolUseId": msg.tool_call_id or "", "content": [block],
                           "status": "success"}}


def _blocks(req: ChatCompletionRequest, i: int, images: Images | None) -> tuple[str, list[Body]]:
    msg = req.messages[i]
    if msg.role == "tool":
        return "user", [_tool_result(msg)]
    out: list[Body] = []
    if msg.role == "assistant":
        for r in c.reasoning_of(msg):
            if r.encrypted is not None:
                out.append({"reasoningContent": {"redactedContent": r.encrypted}})
            else:
                rt: Body = {"text": r.text}
                if r.signature:
                    rt["signature"] = r.signature
                out.append({"reasoningContent": {"reasoningText": rt}})
    for pi, p in enumerate(c.parts(msg)):
        if p.get("type") == "text" and p.get("text"):
            out.append({"text": p["text"]})
        elif c.image_url_of(p) is not None and images is not None:
            img = images.get(i, pi)
            out.append({"image": {"format": img.media_type.split("/")[1],
                                  "source": {"bytes": img.b64()}}})
    for call in msg.tool_calls or []:
        out.append({"toolUse": {"toolUseId": call.get("id") or c.new_call_id(),
                                "name": (call.get("function") or {}).get("name", ""),
                                "input": c.tool_arguments(call)}})
    return ("assistant" if msg.role == "assistant" else "user"), out


def to_converse(req: ChatCompletionRequest, bedrock_provider: str,
                images: Images | None = None) -> Body:
    """The Converse request body for ``req`` (model id goes in the URL).

    Raises:
        InvalidParameterValue: thinking for a non-anthropic model, tool_choice none with
            tool history, response_format together with tools, a bad tool or schema.
    """
    body: Body = {}
    system = [{"text": m.text()} for m in req.messages if m.role in ("system", "developer")
              and m.text()]
    messages: list[Body] = []
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            continue
        role, blocks = _blocks(req, i, images)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:  # Bedrock wants alternating roles
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    if system:
        body["system"] = system
    body["messages"] = messages
    max_tokens = req.effective_max_tokens()
    extra: Body = {}
    budget = c.thinking_budget(req, max_tokens)
    if budget is not None:
        if bedrock_provider != "anthropic":
            raise InvalidParameterValue(
                f"thinking / reasoning_effort is only supported for bedrock_provider "
                f"'anthropic' on amazon-bedrock, not '{bedrock_provider}'.")
        extra["thinking"] = {"type": "enabled", "budget_tokens": budget}
        max_tokens = max_tokens or budget + 4096
    if req.top_k is not None:
        if bedrock_provider != "anthropic":
            raise InvalidParameterValue("top_k is only supported for bedrock_provider "
                                        "'anthropic'; pass it in extra_params.")
        extra["top_k"] = req.top_k
    inference: Body = {}
    for key, value in (("maxTokens", max_tokens), ("temperature", req.temperature),
                       ("topP", req.top_p), ("stopSequences", req.stop)):
        if value is not None:
            inference[key] = value
    if inference:
        body["inferenceConfig"] = inference
    tools = c.tools_of(req)
    choice = c.tool_choice_of(req, tools)
    kind, schema, _ = c.response_schema(req)
    if kind != "text":
        if tools:
            raise InvalidParameterValue("response_format together with tools is not "
                                        "supported by amazon-bedrock.")
        tools = [c.Tool(STRUCTURED_TOOL, "Answer with this tool; its input is the answer.",
                        schema or {"type": "object"})]
        choice = STRUCTURED_TOOL
    has_tool_blocks = any("toolUse" in b or "toolResult" in b
                          for m in messages for b in m["content"])
    if tools and choice == "none":
        if has_tool_blocks:
            raise InvalidParameterValue(
                "tool_choice 'none' is not supported by amazon-bedrock when the history has "
                "tool calls (Bedrock requires toolConfig then); use 'auto'.")
    elif tools:
        tc: Body = {"tools": [{"toolSpec": {"name": t.name, **(
            {"description": t.description} if t.description else {}),
            "inputSchema": {"json": t.parameters}}} for t in tools]}
        if choice in (None, "auto"):
            tc["toolChoice"] = {"auto": {}}
        elif choice == "required":
            tc["toolChoice"] = {"any": {}}
        else:
            tc["toolChoice"] = {"tool": {"name": choice}}
        body["toolConfig"] = tc
    if extra:
        body["additionalModelRequestFields"] = extra
    for key, value in (req.extra_params or {}).items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def from_converse(data: Body, structured: bool) -> tuple[c.Answer, dict[str, int]]:
    """An answer and usage from a Converse response body."""
    ans = c.Answer()
    content = ((data.get("output") or {}).get("message") or {}).get("content") or []
    for block in content:
        if "text" in block:
            ans.text += block["text"]
        elif "reasoningContent" in block:
            rc = block["reasoningContent"]
            if "redactedContent" in rc:
                ans.reasoning.append(c.Reasoning(encrypted=rc["redactedContent"]))
            else:
                rt = rc.get("reasoningText") or {}
                ans.reasoning.append(c.Reasoning(rt.get("text", ""), rt.get("signature")))
        elif "toolUse" in block:
            tu = block["toolUse"]
            if structured and tu.get("name") == STRUCTURED_TOOL:
                ans.text += json.dumps(tu.get("input"))
            else:
                ans.tool_calls.append(c.tool_call(tu.get("toolUseId") or c.new_call_id(),
                                                  tu.get("name", ""), tu.get("input") or {}))
    reason = STOP_REASONS.get(data.get("stopReason") or "", "stop")
    if structured and reason == "tool_calls":
        reason = "stop"
    ans.finish_reason = reason
    u = data.get("usage") or {}
    thought = sum(len(r.text) for r in ans.reasoning)
    return ans, c.usage(int(u.get("inputTokens", 0)), int(u.get("outputTokens", 0)),
                        c.estimate_reasoning_tokens(thought) or None)


async def event_stream(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Body]]:
    """``(event type, JSON payload)`` of an ``application/vnd.amazon.eventstream`` body.

    Raises:
        FmserveError: an exception frame (mapped like HTTP errors), or BadGateway for a
            corrupt frame (CRC mismatch, bad lengths) or a payload that is not JSON.
    """
    buf = EventStreamBuffer()
    async for data in resp.content.iter_any():
        buf.add_data(data)
        try:
            messages = list(buf)
        except ParserError as exc:
            raise BadGateway(f"The stream from amazon-bedrock is corrupt: {exc}") from None
        for m in messages:
            headers = m.headers
            try:
                payload = orjson.loads(m.payload) if m.payload else {}
            except orjson.JSONDecodeError:
                raise BadGateway("amazon-bedrock sent a stream event that is not JSON: "
                                 f"{m.payload[:200]!r}") from None
            kind = headers.get(":message-type", "event")
            if kind == "exception":
                raise bedrock_error(400, m.payload, None,
                                    str(headers.get(":exception-type", "")))
            if kind == "error":
                raise bedrock_error(500, json.dumps({"message": headers.get(
                    ":error-message", "")}), None, str(headers.get(":error-code", "")))
            yield str(headers.get(":event-type", "")), payload
