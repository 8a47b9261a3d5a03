"""Gemini wire format: OpenAI-style chat ⇄ ``generateContent`` (pure functions, dict in/out).

The Gemini API and Vertex AI take the same body. Sources:

* ``GenerateContentRequest`` / ``Content`` / ``Part`` / ``GenerationConfig`` /
  ``ThinkingConfig`` / ``UsageMetadata`` / ``FinishReason``:
  https://ai.google.dev/api/generate-content and
  https://cloud.google.com/vertex-ai/docs/reference/rest/v1/Content
* tools: ``FunctionDeclaration.parametersJsonSchema`` (plain JSON Schema, so nothing
  has to be stripped to OpenAPI 3.0), ``ToolConfig.functionCallingConfig``
  (``mode`` AUTO/ANY/NONE, ``allowedFunctionNames``): https://ai.google.dev/api/caching#Tool
* structured output: ``generationConfig.responseMimeType`` + ``responseJsonSchema``;
* thought signatures: https://ai.google.dev/gemini-api/docs/thought-signatures

Mapping (request): ``system``/``developer`` → ``systemInstruction``; ``user`` → role
``user`` (text and ``inlineData`` images); ``assistant`` → role ``model`` (reasoning →
``thought`` parts, text, ``functionCall`` parts); consecutive ``tool`` messages → one
``user`` turn of ``functionResponse`` parts (name looked up from the call id; a JSON
object result is sent as is, anything else as ``{"result": <text>}``).

Thought signatures (opaque, must come back on the part they arrived on — Gemini 3
answers 400 when a ``functionCall`` part of the current turn lacks its signature):

* on a ``thought`` part → the signature of that reasoning item;
* on a ``functionCall`` part → carried inside the tool call id
  (``call_<hex>~ts~<signature>``), so it survives every client that echoes tool call
  ids (all must, to send tool results); a ``thought_signature`` field on the tool call
  dict is honoured too;
* on a text part → a reasoning item with empty text and that signature, sent back on
  the message's text part.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.providers import common
from fmserve.providers.images import Images

Body = dict[str, Any]

SIG_SEP = "~ts~"

FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
          "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
          "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
          "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter"}
# JSON-schema keywords no Gemini schema field accepts.
_DROP = ("$schema", "$id")


def call_id(signature: str | None) -> str:
    """A fresh tool call id; a thought signature rides along after :data:`SIG_SEP`."""
    base = common.new_call_id()
    return f"{base}{SIG_SEP}{signature}" if signature else base


def signature_of_call(call: dict[str, Any]) -> str | None:
    """The thought signature of a history tool call (field, else encoded in its id)."""
    if call.get("thought_signature"):
        return str(call["thought_signature"])
    cid = str(call.get("id") or "")
    return cid.split(SIG_SEP, 1)[1] if SIG_SEP in cid else None


def clean_schema(schema: Any) -> Any:
    """``schema`` without the keywords Gemini rejects (``$schema``, ``$id``), recursively."""
    if isinstance(schema, dict):
        return {k: clean_schema(v) for k, v in schema.items() if k not in _DROP}
    if isinstance(schema, list):
        return [clean_schema(v) for v in schema]
    return schema


def _tool_result(content: str) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {"result": content}
    return value if isinstance(value, dict) else {"result": content}


def _assistant_parts(msg: Any) -> list[Body]:
    out: list[Body] = []
    pending_sig = None  # a text part's signature (reasoning item with empty text)
    for r in common.reasoning_of(msg):
        if r.text:
            part: Body = {"text": r.text, "thought": True}
            if r.signature:
                part["thoughtSignature"] = r.signature
            out.append(part)
        elif r.signature:
            pending_sig = r.signature
    text = msg.text()
    if text or pending_sig:
        part = {"text": text}
        if pending_sig:
            part["thoughtSignature"] = pending_sig
        out.append(part)
    for call in msg.tool_calls or []:
        fn = call.get("function") or {}
        part = {"functionCall": {"name": fn.get("name"), "args": common.tool_arguments(call)}}
        sig = signature_of_call(call)
        if sig:
            part["thoughtSignature"] = sig
        out.append(part)
    return out


def to_contents(req: ChatCompletionRequest, images: Images) -> tuple[Body | None, list[Body]]:
    """``(systemInstruction, contents)`` for ``req.messages``.

    Raises:
        InvalidParameterValue: a tool message whose ``tool_call_id`` matches no earlier
            assistant tool call, or a conversation with no user/assistant turn.
    """
    system: list[str] = []
    contents: list[Body] = []
    names: dict[str, str] = {}
    for mi, msg in enumerate(req.messages):
        if msg.role in ("system", "developer"):
            system.append(msg.text())
        elif msg.role == "user":
            parts: list[Body] = []
            for pi, p in enumerate(common.parts(msg)):
                if p.get("type") == "text":
                    parts.append({"text": p.get("text") or ""})
                elif p.get("type") in ("image_url", "image"):
                    img = images.get(mi, pi)
                    parts.append({"inlineData": {"mimeType": img.media_type, "data": img.b64()}})
            contents.append({"role": "user", "parts": parts or [{"text": ""}]})
        elif msg.role == "assistant":
            for call in msg.tool_calls or []:
                names[str(call.get("id"))] = str((call.get("function") or {}).get("name"))
            contents.append({"role": "model", "parts": _assistant_parts(msg) or [{"text": ""}]})
        else:  # tool
            name = names.get(str(msg.tool_call_id))
            if name is None:
                raise InvalidParameterValue(
                    f"messages[{mi}]: tool_call_id '{msg.tool_call_id}' matches no tool call "
                    f"of an earlier assistant message.")
            part = {"functionResponse": {"name": name, "response": _tool_result(msg.text())}}
            prev = contents[-1] if contents else None
            if prev and prev["role"] == "user" and "functionResponse" in prev["parts"][-1]:
                prev["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part]})
    if not contents:
        raise InvalidParameterValue("messages must contain at least one user or assistant "
                                    "message besides system messages.")
    instruction = {"parts": [{"text": "\n\n".join(system)}]} if system else None
    return instruction, contents


def _tool_config(req: ChatCompletionRequest, tools: list[common.Tool]) -> Body | None:
    choice = common.tool_choice_of(req, tools)
    if choice is None:
        return None
    mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice)
    if mode:
        return {"functionCallingConfig": {"mode": mode}}
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice]}}


def generation_config(req: ChatCompletionRequest) -> Body:
    """``generationConfig``: limits, sampling, stop, JSON output, thinking."""
    cfg: Body = {}
    max_tokens = req.effective_max_tokens()
    extra = req.model_extra or {}
    for key, value in (("maxOutputTokens", max_tokens), ("temperature", req.temperature),
                       ("topP", req.top_p), ("topK", req.top_k), ("stopSequences", req.stop),
                       ("seed", req.seed), ("presencePenalty", extra.get("presence_penalty")),
                       ("frequencyPenalty", extra.get("frequency_penalty"))):
        if value is not None:
            cfg[key] = value
    kind, schema, _ = common.response_schema(req)
    if kind != "text":
        cfg["responseMimeType"] = "application/json"
    if schema is not None:
        cfg["responseJsonSchema"] = clean_schema(schema)
    budget = common.thinking_budget(req, max_tokens)
    if budget is not None:
        cfg["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True}
    return cfg


def request_body(req: ChatCompletionRequest, images: Images) -> Body:
    """The ``generateContent`` body for ``req``; ``extra_params`` merged last (an object
    such as ``generationConfig`` is merged into fmserve's, so ``{"generationConfig":
    {"responseModalities": [...]}}`` keeps ``maxOutputTokens``).

    Raises:
        InvalidParameterValue: invalid tools, tool_choice, response_format, thinking or
            history (see :mod:`fmserve.providers.common`).
    """
    instruction, contents = to_contents(req, images)
    body: Body = {"contents": contents}
    if instruction:
        body["systemInstruction"] = instruction
    tools = common.tools_of(req)
    if tools:
        body["tools"] = [{"functionDeclarations": [
            {"name": t.name, "description": t.description,
             "parametersJsonSchema": clean_schema(t.parameters)} for t in tools]}]
    tool_config = _tool_config(req, tools)
    if tool_config:
        body["toolConfig"] = tool_config
    cfg = generation_config(req)
    if cfg:
        body["generationConfig"] = cfg
    for key, value in (req.extra_params or {}).items():  # objects merged one level deep
        both = isinstance(value, dict) and isinstance(body.get(key), dict)
        body[key] = {**body[key], **value} if both else value
    return body


@dataclass
class Piece:
    """One part of a Gemini answer: ``kind`` is thought, text or call."""

    kind: str
    text: str = ""
    signature: str | None = None
    name: str = ""
    args: Any = None


def pieces(candidate: Body) -> Iterator[Piece]:
    """The parts of one candidate, in order."""
    for part in (candidate.get("content") or {}).get("parts") or []:
        sig = part.get("thoughtSignature")
        if "functionCall" in part:
            fc = part["functionCall"] or {}
            yield Piece("call", signature=sig, name=str(fc.get("name") or ""),
                        args=fc.get("args") or {})
        elif part.get("thought"):
            if part.get("text") or sig:
                yield Piece("thought", str(part.get("text") or ""), sig)
        elif "text" in part:
            yield Piece("text", str(part.get("text") or ""), sig)


def finish_reason(raw: str | None, has_calls: bool) -> str:
    if has_calls and raw in (None, "STOP"):
        return "tool_calls"
    return FINISH.get(raw or "STOP", "stop")


def usage_of(body: Body) -> tuple[int, int, int]:
    """``(prompt, completion, reasoning)`` tokens of ``usageMetadata``; completion
    counts the thoughts (``candidatesTokenCount + thoughtsTokenCount``)."""
    u = body.get("usageMetadata") or {}
    thoughts = int(u.get("thoughtsTokenCount") or 0)
    return (int(u.get("promptTokenCount") or 0),
            int(u.get("candidatesTokenCount") or 0) + thoughts, thoughts)


def from_response(body: Body) -> tuple[common.Answer, dict[str, int]]:
    """The answer and usage of a ``GenerateContentResponse`` (first candidate).

    A prompt blocked by safety filters (``promptFeedback.blockReason``, no candidates)
    is an empty answer with ``finish_reason`` ``content_filter``.
    """
    if isinstance(body, list):  # Vertex sometimes wraps an answer in a list
        body = body[0] if body else {}
    candidates = (body.get("candidates") if isinstance(body, dict) else None) or []
    answer = common.Answer()
    if not candidates:
        answer.finish_reason = "content_filter" if (body.get("promptFeedback") or {}).get(
            "blockReason") else "stop"
    else:
        for p in pieces(candidates[0]):
            if p.kind == "thought":
                answer.reasoning.append(common.Reasoning(p.text, p.signature))
            elif p.kind == "text":
                answer.text += p.text
                if p.signature:
                    answer.reasoning.append(common.Reasoning("", p.signature))
            else:
                answer.tool_calls.append(common.tool_call(call_id(p.signature), p.name, p.args))
        answer.finish_reason = finish_reason(candidates[0].get("finishReason"),
                                             bool(answer.tool_calls))
    prompt, completion, reasoning = usage_of(body)
    return answer, common.usage(prompt, completion, reasoning or None)
