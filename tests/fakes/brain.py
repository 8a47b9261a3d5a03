"""The provider-neutral "model" behind every fake provider.

Each fake translates its provider's native request into a :class:`Seen` and turns the
:class:`Reply` from :func:`think` into its native answer (JSON or stream). So every
provider is tested with the same behaviour, and tests can predict the answer:

* the last user text contains ``FAIL:400|401|429|500|timeout|reset`` → :attr:`Reply.fail`
  (the fake answers its provider's error body, never answers, or breaks the stream
  after the first event);
* a forced tool (``tool_choice`` named or ``required``) or ``auto`` with the word
  "weather" in the last user text → tool calls with arguments built from the schema
  (two calls when the text says "parallel");
* the last message is a tool result → ``"Tool said: <result>"``;
* a JSON schema (response format, or a forced tool used for structured output) →
  a JSON instance of that schema;
* a thinking budget → reasoning text ``"Thinking about: <user text>"`` with a signature;
* otherwise ``"Echo: <user text>"`` followed by ``[system: …]``, ``[turns: N]`` and
  ``[images: N]`` markers so tests can see what reached the provider.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    """A provider request, provider-neutral."""

    system: str = ""
    turns: list[dict[str, Any]] = field(default_factory=list)
    # each turn: {"role": "user"|"assistant"|"tool", "text": str, "images": int,
    #             "tool_calls": [name, ...], "tool_result": str | None,
    #             "reasoning": [(text, signature)]}
    tools: list[dict[str, Any]] = field(default_factory=list)  # {"name", "parameters"}
    tool_choice: str = "auto"  # auto | none | required | <tool name>
    thinking_budget: int | None = None
    json_schema: dict[str, Any] | None = None
    max_tokens: int | None = None

    def last_user(self) -> str:
        for t in reversed(self.turns):
            if t["role"] == "user":
                return str(t.get("text") or "")
        return ""


@dataclass
class Reply:
    text: str = ""
    reasoning: str | None = None
    signature: str | None = None
    tool_calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # id,name,args
    finish: str = "stop"  # stop | length | tool_calls
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    fail: str | None = None  # 400 | 401 | 429 | 500 | timeout | reset


def instance(schema: dict[str, Any]) -> Any:
    """A small value valid for ``schema`` (objects, arrays, enums, scalars)."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return instance(schema[key][0])
    t = schema.get("type", "object")
    if isinstance(t, list):
        t = t[0]
    if t == "object":
        props = schema.get("properties", {})
        keys = schema.get("required", list(props))
        return {k: instance(props.get(k, {"type": "string"})) for k in keys}
    if t == "array":
        return [instance(schema.get("items", {"type": "string"}))] * max(1, schema.get(
            "minItems", 1))
    if t == "integer":
        return max(3, int(schema.get("minimum", 3)))
    if t == "number":
        return 2.5
    if t == "boolean":
        return True
    if t == "null":
        return None
    return "Paris"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def call_id(name: str, n: int) -> str:
    return f"call_{hashlib.sha1(f'{name}{n}'.encode()).hexdigest()[:12]}"


def think(seen: Seen) -> Reply:
    user = seen.last_user()
    prompt = " ".join(str(t.get("text") or "") for t in seen.turns) + seen.system
    reply = Reply(prompt_tokens=_tokens(prompt) + 5)
    m = re.search(r"FAIL:(\w+)", user)
    if m:
        reply.fail = m.group(1)
    if seen.thinking_budget:
        reply.reasoning = f"Thinking about: {user}"
        reply.signature = "sig-" + hashlib.sha1(user.encode()).hexdigest()[:16]
        reply.reasoning_tokens = _tokens(reply.reasoning)
    last = seen.turns[-1] if seen.turns else {}
    tools = {t["name"]: t for t in seen.tools}
    forced = seen.tool_choice if seen.tool_choice in tools else None
    wants_tool = forced or (seen.tools and seen.tool_choice == "required") or (
        seen.tools and seen.tool_choice == "auto" and "weather" in user.lower()
        and last.get("role") != "tool")
    if wants_tool and not seen.json_schema:
        names = [forced] if forced else [seen.tools[0]["name"]]
        if "parallel" in user.lower() and not forced:
            names = [t["name"] for t in seen.tools[:2]] if len(seen.tools) > 1 else names * 2
        for i, name in enumerate(names):
            args = instance(tools[name].get("parameters") or {})
            reply.tool_calls.append((call_id(name, i), name, args))
        reply.finish = "tool_calls"
    elif last.get("role") == "tool":
        reply.text = f"Tool said: {last.get('tool_result')}"
    elif seen.json_schema is not None:
        reply.text = json.dumps(instance(seen.json_schema))
    else:
        images = sum(int(t.get("images") or 0) for t in seen.turns)
        reply.text = (f"Echo: {user} [system: {seen.system}] [turns: {len(seen.turns)}] "
                      f"[images: {images}]")
    if seen.max_tokens is not None and seen.max_tokens < 8 and not reply.tool_calls:
        reply.text, reply.finish = reply.text[: seen.max_tokens * 4], "length"
    out = reply.text + "".join(json.dumps(a) for _, _, a in reply.tool_calls)
    reply.completion_tokens = _tokens(out) + reply.reasoning_tokens
    return reply


def pieces(text: str, n: int = 3) -> list[str]:
    """``text`` cut into ``n`` stream deltas (non-empty where possible)."""
    if not text:
        return []
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)]
