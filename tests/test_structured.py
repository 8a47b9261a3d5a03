"""Grammar-enforced structured outputs and function calling on the local SmolLM2 model."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import CHAT, Server, openai_for
from openai import BadRequestError, OpenAI

from fmserve.engines.structured import ToolPlan, check_schema
from fmserve.errors import InvalidParameterValue

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "address", "pets"],
          "properties": {
              "name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer"},
              "address": {"type": "object", "additionalProperties": False,
                          "required": ["city", "country"],
                          "properties": {"city": {"type": "string", "maxLength": 20},
                                         "country": {"enum": ["FR", "DE", "US"]}}},
              "pets": {"type": "array", "maxItems": 3,
                       "items": {"enum": ["cat", "dog", "fish"]}}}}


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return openai_for(server)


def _check_call(call, tools: list[dict]) -> dict:  # type: ignore[no-untyped-def,type-arg]
    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, fn["parameters"])
    assert call.id.startswith("call_") and call.type == "function"
    return args  # type: ignore[no-any-return]


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_forced_tool_call_matches_schema(client: OpenAI, choice: object) -> None:
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER, ADD], tool_choice=choice, max_tokens=80, temperature=0)  # type: ignore[arg-type]
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content is None and msg.tool_calls
    args = _check_call(msg.tool_calls[0], [WEATHER, ADD])
    if isinstance(choice, dict):
        assert msg.tool_calls[0].function.name == "get_weather"
        assert args["unit"] in ("celsius", "fahrenheit")


def test_auto_answers_in_text_or_a_valid_call(client: OpenAI) -> None:
    for prompt in ("Add 2 and 3 using the add tool.", "Say hello to Anna."):
        r = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": prompt}], tools=[ADD],
            max_tokens=40, temperature=0)
        msg = r.choices[0].message
        if msg.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            _check_call(msg.tool_calls[0], [ADD])
        else:
            assert msg.content and not msg.content.lstrip().startswith("{")


def test_streamed_tool_call_has_id_and_name_on_first_delta(client: OpenAI) -> None:
    deltas, finish = [], None
    for chunk in client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Weather in Rome, in celsius?"}],
            tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            deltas.extend(chunk.choices[0].delta.tool_calls)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    first = deltas[0]
    assert first.index == 0 and first.id and first.function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_tool_result_turn(client: OpenAI) -> None:
    r = client.chat.completions.create(model=CHAT, tools=[WEATHER], max_tokens=40, temperature=0,
                                       messages=[
        {"role": "user", "content": "What is the weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}])
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    assert r.usage and r.usage.prompt_tokens > 50  # the history and tool list were rendered


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_nested_objects_arrays_enums(client: OpenAI, stream: bool) -> None:
    kwargs = {"model": CHAT, "max_tokens": 150, "temperature": 0,
              "messages": [{"role": "user", "content": "Describe a person who owns pets."}],
              "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}}
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kwargs) if c.choices)
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content or ""
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=CHAT, max_tokens=200, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user",
                   "content": 'Return a JSON object with the key "capital" for France.'}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "parameters"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "wat"}}}}}]}, "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 5, "maximum": 3}}}},
     "Unsatisfiable schema: minimum (5) is greater than maximum (3)"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": False}}}, "false"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"$ref": "https://example.com/other.json"}}}}, "cannot be enforced"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "schema"),
    ({"response_format": {"type": "xml"}}, "xml"),
])
def test_bad_tools_and_schemas_are_400(client: OpenAI, kwargs: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, **kwargs)
    assert exc.value.status_code == 400 and needle in str(exc.value)


def test_tool_plan_units() -> None:
    plan = ToolPlan([ADD], "required")
    calls = plan.parse('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert calls and json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert plan.parse("hello") is None
    assert ToolPlan([ADD], "none").grammar() is None
    assert ToolPlan([ADD], "auto").grammar()["type"] == "tool_auto"  # type: ignore[index]
    with pytest.raises(InvalidParameterValue, match="not a valid JSON Schema"):
        check_schema({"type": "integer", "minimum": "two"}, "s")
