"""Provider-neutral pieces of request/response translation.

The internal format is the OpenAI/Databricks chat format (spec §8.1–§8.3). Providers
read requests through these helpers and build answers with :func:`chat_answer` and
:class:`ChunkWriter`, so every provider answers in exactly the same shape:

* ``message.content`` is a string, or — when there is reasoning — the list of
  ``{"type": "reasoning", "summary": [{"type": "summary_text", "text", "signature"}]}``
  and ``{"type": "text", "text"}`` blocks (spec §8.2);
* tool calls are ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
  ``content: null`` and ``finish_reason: "tool_calls"``;
* ``usage`` has ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and, for
  reasoning, ``reasoning_tokens`` (spec §8.6); stream chunks carry it cumulatively.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from fmserve.errors import BadGateway, InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest, ChatMessage
from fmserve.protocol.responses import (  # noqa: F401  (providers use them as common.*)
    ADAPTIVE_BUDGET,
    chat_chunk,
    estimate_reasoning_tokens,
    reasoning_item,
    requested_thinking,
    usage,
)
from fmserve.protocol.schemas import load_schema

Body = dict[str, Any]

MIN_THINKING_BUDGET = 1024  # Anthropic's minimum budget_tokens


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parts(msg: ChatMessage) -> list[dict[str, Any]]:
    """``msg.content`` as a list of content-part dicts (a string is one text part)."""
    if msg.content is None:
        return []
    if isinstance(msg.content, str):
        return [{"type": "text", "text": msg.content}] if msg.content else []
    return [p.model_dump(exclude_none=True) for p in msg.content]


@dataclass
class Reasoning:
    """One prior reasoning block sent back in history (signature kept for the provider)."""

    text: str = ""
    signature: str | None = None
    encrypted: str | None = None  # summary_encrypted_text data (redacted thinking)


def reasoning_of(msg: ChatMessage) -> list[Reasoning]:
    """The ``reasoning`` content items of an assistant message, in order."""
    out = []
    for p in parts(msg):
        if p.get("type") != "reasoning":
            continue
        for s in p.get("summary") or []:
            if s.get("type") == "summary_encrypted_text":
                out.append(Reasoning(encrypted=s.get("data")))
            else:
                out.append(Reasoning(text=s.get("text", ""), signature=s.get("signature")))
    return out


def image_url_of(part: dict[str, Any]) -> str | None:
    """The URL of an ``image_url`` (OpenAI) or ``image`` (FMAPI) content part."""
    if part.get("type") not in ("image_url", "image"):
        return None
    iu = part.get("image_url")
    return iu.get("url") if isinstance(iu, dict) else iu


def tool_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """Parsed ``function.arguments`` of a history tool call.

    Raises:
        InvalidParameterValue: the arguments are not a JSON object.
    """
    args = (call.get("function") or {}).get("arguments") or "{}"
    if isinstance(args, dict):
        return args
    try:
        value = json.loads(args)
    except ValueError:
        raise InvalidParameterValue(
            f"tool call '{call.get('id')}' has arguments that are not JSON: {args[:100]!r}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidParameterValue(f"tool call '{call.get('id')}' arguments must be an object")
    return value


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool | None = None


def tools_of(req: ChatCompletionRequest) -> list[Tool]:
    """The request's function tools, validated.

    Raises:
        InvalidParameterValue: a tool that is not ``type: function``, lacks a name or
            ``parameters``, or whose ``parameters`` is not a valid JSON schema object.
    """
    out = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidParameterValue(f"tools[{i}] must be {{\"type\": \"function\", "
                                        f"\"function\": {{...}}}}")
        if not fn.get("name"):
            raise InvalidParameterValue(f"tools[{i}].function.name is required")
        params = fn.get("parameters")
        if not isinstance(params, dict):
            raise InvalidParameterValue(f"tools[{i}].function.parameters is required "
                                        f"(a JSON schema object)")
        load_schema(params, f"tools[{i}].function.parameters")
        out.append(Tool(fn["name"], fn.get("description") or "", params, fn.get("strict")))
    return out


def tool_choice_of(req: ChatCompletionRequest, tools: list[Tool]) -> str | None:
    """``"auto"``, ``"none"``, ``"required"``, a tool name (forced), or None (not given).

    Raises:
        InvalidParameterValue: an unknown value or a name that is not among the tools.
    """
    tc = req.tool_choice
    if tc is None:
        return None
    if isinstance(tc, str):
        if tc not in ("auto", "none", "required"):
            raise InvalidParameterValue(f"tool_choice must be auto, none, required or a "
                                        f"function, got '{tc}'")
        if tc == "required" and not tools:
            raise InvalidParameterValue("tool_choice 'required' needs tools")
        return tc
    name = ((tc.get("function") or {}).get("name") if isinstance(tc, dict) else None)
    if not name:
        raise InvalidParameterValue("tool_choice must be {\"type\": \"function\", "
                                    "\"function\": {\"name\": ...}}")
    if name not in {t.name for t in tools}:
        raise InvalidParameterValue(f"tool_choice names '{name}', which is not among the "
                                    f"tools {[t.name for t in tools]}")
    return str(name)


def thinking_budget(req: ChatCompletionRequest, max_tokens: int | None) -> int | None:
    """The thinking budget (tokens) to send a provider that takes one; None = no reasoning.

    :func:`~fmserve.protocol.responses.requested_thinking` validates the request;
    ``adaptive`` asks for :data:`~fmserve.protocol.responses.ADAPTIVE_BUDGET`, and a
    caller's ``budget_tokens`` must be at least :data:`MIN_THINKING_BUDGET` (Anthropic's
    extended thinking rule, spec §8.1, which Bedrock and Gemini share).

    Raises:
        InvalidParameterValue: a malformed ``thinking`` or a budget out of range.
    """
    t = requested_thinking(req.thinking, req.reasoning_effort, max_tokens)
    if t.mode != "on":
        return None
    if t.budget is None:
        return ADAPTIVE_BUDGET
    if t.explicit and t.budget < MIN_THINKING_BUDGET:
        raise InvalidParameterValue(f"thinking.budget_tokens must be at least "
                                    f"{MIN_THINKING_BUDGET}, got {t.budget}")
    return t.budget


def response_schema(req: ChatCompletionRequest) -> tuple[str, dict[str, Any] | None, str]:
    """``(kind, schema, name)`` of ``response_format``: kind is text, json_object or json_schema.

    Raises:
        InvalidParameterValue: an unknown type or a json_schema without a valid schema.
    """
    rf = req.response_format
    if not rf:
        return "text", None, ""
    kind = rf.get("type")
    if kind in (None, "text"):
        return "text", None, ""
    if kind == "json_object":
        return "json_object", None, "json_object"
    if kind != "json_schema":
        raise InvalidParameterValue(f"response_format.type must be text, json_object or "
                                    f"json_schema, got '{kind}'")
    js = rf.get("json_schema") or {}
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise InvalidParameterValue("response_format.json_schema.schema is required")
    load_schema(schema, "response_format.json_schema.schema")
    return "json_schema", schema, str(js.get("name") or "response")


def check_structured(text: str, req: ChatCompletionRequest) -> None:
    """Validate a final answer against ``response_format``.

    Raises:
        BadGateway: the provider's answer is not JSON, or does not match the schema.
    """
    kind, schema, _ = response_schema(req)
    if kind == "text":
        return
    try:
        value = json.loads(text)
    except ValueError:
        raise BadGateway(f"The model's answer is not valid JSON although response_format "
                         f"{kind} was requested: {text[:200]!r}") from None
    if kind == "json_object" and not isinstance(value, dict):
        raise BadGateway("The model's answer is JSON but not an object (response_format "
                         "json_object).")
    if schema is not None:
        why = load_schema(schema, "response_format.json_schema.schema").violation(value)
        if why:
            raise BadGateway(f"The model's answer does not match the response_format schema "
                             f"{why}")


@dataclass
class Answer:
    """One choice of a provider answer, provider-neutral."""

    text: str = ""
    reasoning: list[Reasoning] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI shape
    finish_reason: str = "stop"

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant"}
        if self.reasoning:
            blocks = [reasoning_item(r.text, r.signature, r.encrypted) for r in self.reasoning]
            if self.text:
                blocks.append({"type": "text", "text": self.text})
            msg["content"] = blocks
        else:
            msg["content"] = self.text if (self.text or not self.tool_calls) else None
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def chat_answer(answers: list[Answer], usage_: dict[str, int]) -> Body:
    """A chat completion body (no id/model/created; the serving layer adds them)."""
    return {"object": "chat.completion",
            "choices": [{"index": i, "message": a.message(), "finish_reason": a.finish_reason}
                        for i, a in enumerate(answers)],
            "usage": usage_}


def tool_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


class ChunkWriter:
    """Builds ``chat.completion.chunk`` dicts for one streamed choice with cumulative usage.

    Tool calls get a stable ``index`` (order of appearance) and the first delta of each
    carries ``id``, ``type`` and ``function.name``; argument deltas never send a ``{}``
    placeholder (spec §8.3).
    """

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.text = ""
        self.role_sent = False
        self._calls: dict[Any, int] = {}

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.reasoning_tokens or None)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> Body:
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        return chat_chunk(0, delta, finish, self.usage())

    def start(self) -> Body:
        return self._chunk({"content": ""})

    def text_delta(self, text: str) -> Body:
        self.text += text
        return self._chunk({"content": text})

    def reasoning_delta(self, text: str = "", signature: str | None = None,
                        encrypted: str | None = None) -> Body:
        return self._chunk({"content": [reasoning_item(text, signature, encrypted)]})

    def tool_start(self, key: Any, call_id: str, name: str, arguments: str = "") -> Body:
        index = self._calls.setdefault(key, len(self._calls))
        fn: dict[str, Any] = {"name": name, "arguments": arguments}
        return self._chunk({"content": None, "tool_calls": [
            {"index": index, "id": call_id, "type": "function", "function": fn}]})

    def tool_args(self, key: Any, arguments: str) -> Body:
        index = self._calls[key]
        return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})

    def finish(self, reason: str) -> Body:
        if reason == "stop" and self._calls:
            reason = "tool_calls"
        return self._chunk({}, reason)
