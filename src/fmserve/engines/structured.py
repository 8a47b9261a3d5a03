"""Structured outputs and function calling for local models, enforced by grammar.

Pure functions (no llama.cpp import), used by :mod:`fmserve.engines.local` to turn
a request's ``response_format`` / ``tools`` / ``tool_choice`` into

* a **grammar spec** for the worker — ``{"type": "json_object"}``,
  ``{"type": "json_schema", "schema": {...}}`` or
  ``{"type": "tool_auto", "schema": {...}}`` (a tool call *or* free text that does
  not start with ``{``) — compiled there by llguidance
  (:mod:`fmserve.engines.grammar`);
* the **prompt**: tool definitions go into the system message, since small GGUF
  chat templates (SmolLM2's included) have no tool support; assistant tool calls
  and ``role: tool`` results in the history are rendered as text (documented
  fallback format below);
* and back: the generated JSON → OpenAI ``tool_calls``.

Fallback prompt format (OpenAI function-calling semantics, text rendering)::

    system:    <original system text>\n\n# Tools\n<json list of functions>\n<how to call>
    assistant: {"name": "get_weather", "arguments": {"city": "Paris"}}   (a past call)
    tool:      {"tool_call_id": "call_…", "content": "..."}              (its result)

Schemas are read by :func:`fmserve.protocol.schemas.load_schema` (any draft; unknown
keywords are ignored and logged). A tool's ``parameters`` keep their own ``$defs``
and ``$ref``s: the call schema nests each under ``#/$defs/fn<i>`` with its refs
re-rooted. Every finished answer is checked against the full schema
(:func:`answer_violation`), since a grammar cannot enforce every keyword.

Raises :class:`~fmserve.errors.InvalidParameterValue` (400) for tools without
``parameters``, invalid JSON Schemas and ``tool_choice`` naming an unknown function.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.schemas import OutputSchema, load_schema, ref_rooted, with_type_aliases

log = logging.getLogger("fmserve.structured")


def check_schema(schema: Any, where: str) -> OutputSchema:
    """The loaded schema (see :func:`~fmserve.protocol.schemas.load_schema`); its
    ignored keywords are logged once per distinct schema.

    Raises:
        InvalidParameterValue: not a JSON Schema under any draft.
    """
    loaded = load_schema(schema, where)
    if loaded.ignored and loaded.digest not in _LOGGED:
        _LOGGED.add(loaded.digest)
        log.info("%s: ignored keywords (annotations, not constraints): %s", where,
                 ", ".join(loaded.ignored[:20]))
    return loaded


_LOGGED: set[str] = set()


def response_grammar(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """Grammar spec for ``response_format`` (``text`` → None)."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidParameterValue(
                "response_format.json_schema must be {\"name\", \"schema\", \"strict\"?}.")
        check_schema(spec["schema"], "response_format.json_schema.schema")
        return {"type": "json_schema", "schema": spec["schema"]}
    raise InvalidParameterValue(
        f"response_format.type '{kind}' is not one of text, json_object, json_schema.")


class ToolPlan:
    """What ``tools`` + ``tool_choice`` mean for one request.

    Attributes:
        mode: ``"none"`` (answer in text), ``"auto"`` (text or a call),
            ``"required"`` (at least one call) or ``"named"`` (that function).
        functions: ``{name: parameters schema}`` of the offered tools.
    """

    def __init__(self, tools: list[dict[str, Any]] | None, tool_choice: Any,
                 parallel: bool = True) -> None:
        self.functions: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, OutputSchema] = {}
        self.descriptions: list[dict[str, Any]] = []
        for i, tool in enumerate(tools or []):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or \
                    not isinstance(fn, dict) or not fn.get("name"):
                raise InvalidParameterValue(
                    f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                    "\"description\", \"parameters\"}}}.")
            if "parameters" not in fn:
                raise InvalidParameterValue(
                    f"\"parameters\" is a required property for \"function\" object in "
                    f"parameter \"tools\" (tools[{i}] '{fn['name']}').")
            where = f"tools[{i}].function.parameters"
            params, aliased = with_type_aliases(fn["parameters"])
            if aliased:
                log.info("%s: type names read as JSON Schema types at %s", where,
                         ", ".join(aliased))
            self.schemas[fn["name"]] = check_schema(params, where)
            self.functions[fn["name"]] = params
            self.descriptions.append({"name": fn["name"],
                                      "description": fn.get("description", ""),
                                      "parameters": params})
        self.parallel = parallel
        self.named: str | None = None
        if not self.functions:
            self.mode = "none"
            if tool_choice not in (None, "none", "auto"):
                raise InvalidParameterValue("tool_choice needs 'tools'.")
            return
        if tool_choice in (None, "auto"):
            self.mode = "auto"
        elif tool_choice == "none":
            self.mode = "none"
        elif tool_choice in ("required", "any"):
            self.mode = "required"
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            name = tool_choice["function"].get("name")
            if name not in self.functions:
                raise InvalidParameterValue(
                    f"tool_choice names function '{name}', which is not in tools "
                    f"({', '.join(self.functions)}).")
            self.mode, self.named = "named", name
        else:
            raise InvalidParameterValue(
                "tool_choice must be 'auto', 'none', 'required' or "
                "{\"type\": \"function\", \"function\": {\"name\": ...}}.")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def _call_schema(self) -> dict[str, Any]:
        names = [self.named] if self.named else list(self.functions)
        defs = {f"fn{i}": ref_rooted(self.functions[n], f"#/$defs/fn{i}")
                for i, n in enumerate(names)}
        calls = [{"type": "object", "properties": {"name": {"const": n},
                                                   "arguments": {"$ref": f"#/$defs/fn{i}"}},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for i, n in enumerate(names)]
        one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel and self.mode != "named":
            one = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
        return {**one, "$defs": defs}

    def grammar(self) -> dict[str, Any] | None:
        if self.mode in ("required", "named"):
            return {"type": "json_schema", "schema": self._call_schema()}
        if self.mode == "auto":
            return {"type": "tool_auto", "schema": self._call_schema()}
        return None

    def system_text(self) -> str:
        how = {
            "auto": "If a function helps, reply with only a JSON object "
                    '{"name": <function name>, "arguments": {...}}; otherwise answer normally.',
            "required": 'Reply with only a JSON object {"name": <function name>, '
                        '"arguments": {...}} calling one of the functions.',
            "named": f'Reply with only a JSON object {{"name": "{self.named}", '
                     '"arguments": {...}} calling that function.',
        }[self.mode]
        return "# Tools\nYou can call these functions:\n" + json.dumps(
            self.descriptions, ensure_ascii=False) + "\n" + how

    def violation(self, calls: list[dict[str, Any]]) -> str | None:
        """Why parsed ``calls`` break their functions' schemas, or None."""
        for call in calls:
            fn = call["function"]
            why = self.schemas[fn["name"]].violation(json.loads(fn["arguments"]))
            if why:
                return f"the arguments of '{fn['name']}' break its parameters schema {why}"
        return None

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` from generated text, or None when it is plain text."""
        stripped = text.strip()
        if not self.active or not stripped.startswith(("{", "[")):
            return None
        try:
            data = json.loads(stripped)
        except ValueError:
            return None
        items = data if isinstance(data, list) else [data]
        calls = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in self.functions:
                return None
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": item["name"],
                                       "arguments": json.dumps(item.get("arguments", {}),
                                                               ensure_ascii=False)}})
        return calls


def render_history(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, str]]:
    """Chat messages as plain ``{"role", "content"}`` text for the GGUF template.

    Tool definitions join the system message; past tool calls and results become text.
    """
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"],
                      "arguments": _maybe_json(c["function"].get("arguments", "{}"))}
                     for c in m["tool_calls"]]
            content = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
        elif role == "tool":
            content = json.dumps({"tool_call_id": m.get("tool_call_id"), "content": content},
                                 ensure_ascii=False)
        out.append({"role": role, "content": content})
    if plan.active:
        tools_text = plan.system_text()
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_text}
        else:
            out.insert(0, {"role": "system", "content": tools_text})
    return out


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def answer_violation(text: str, response_format: dict[str, Any] | None) -> str | None:
    """Why a finished answer breaks ``response_format`` (json_object/json_schema), or None.
    """
    kind = (response_format or {}).get("type", "text")
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return f"the answer is not JSON: {text[:120]!r}"
    if kind == "json_object":
        return None if isinstance(value, dict) else "the answer is not a JSON object"
    schema = check_schema(response_format["json_schema"]["schema"],  # type: ignore[index]
                          "response_format.json_schema.schema")
    why = schema.violation(value)
    return f"the answer breaks the schema {why}" if why else None
