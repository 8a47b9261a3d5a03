"""Real-world JSON Schemas on local models: accepted, enforced by llguidance, checked after.

Unit tests for the schema rules (drafts, ignored keywords, refusal reasons, post-
validation), the grammar compiler (reasons, bounds, cache) and end-to-end requests
with schemas that used to be refused, unenforced, or to kill the chat worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from conftest import CHAT, Server, openai_for
from openai import OpenAI

from fmserve.engines.grammar import GrammarCompiler, GrammarError
from fmserve.engines.structured import ToolPlan, answer_violation
from fmserve.errors import InvalidParameterValue
from fmserve.protocol.schemas import load_schema

# What Pydantic emits for a model with a nested model (every LangChain tool with one).
ORDER = {"$defs": {"Item": {"properties": {"sku": {"title": "Sku", "type": "string",
                                                   "maxLength": 12},
                                           "qty": {"title": "Qty", "type": "integer",
                                                   "minimum": 1, "maximum": 9}},
                            "required": ["sku", "qty"], "title": "Item", "type": "object"}},
         "properties": {"customer": {"title": "Customer", "type": "string", "maxLength": 20},
                        "items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items",
                                  "type": "array", "minItems": 1, "maxItems": 2}},
         "required": ["customer", "items"], "title": "Order", "type": "object"}
ORDER_TOOL = {"type": "function", "function": {"name": "place_order",
                                               "description": "Place an order",
                                               "parameters": ORDER}}


def _rf(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


# -- schema rules (protocol/schemas.py) -----------------------------------------------------
def test_unknown_keywords_are_ignored_and_listed() -> None:
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "optional": True,
              "properties": {"a": {"type": "string", "_format": "x", "readonly": True},
                             "id": {"type": "integer", "self": {"k": 1}}},
              "items": [{"type": "string", "foo": 1}]}
    loaded = load_schema(schema, "s")
    assert set(loaded.ignored) == {"x-kubernetes-preserve-unknown-fields", "optional",
                                   "properties.a._format", "properties.a.readonly",
                                   "properties.id.self", "items[0].foo"}
    assert loaded.violation({"a": "x", "id": 3}) is None
    assert "is not of type 'integer'" in (loaded.violation({"id": "3"}) or "")


def test_draft_is_the_declared_one_or_the_first_that_fits() -> None:
    draft4 = {"type": "number", "minimum": 0, "exclusiveMinimum": True}  # boolean form
    loaded = load_schema(draft4, "s")
    assert loaded.draft == "Draft4Validator"
    assert loaded.violation(0) and loaded.violation(1) is None
    declared = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer"}
    assert load_schema(declared, "s").draft == "Draft7Validator"
    assert load_schema({"type": "string"}, "s").draft == "Draft202012Validator"


@pytest.mark.parametrize(("schema", "needle"), [
    ([{"type": "string"}], "must be a JSON Schema object"),
    ("string", "must be a JSON Schema object"),
    ({"type": "object", "properties": {"x": {"type": "wat"}}},
     "not a valid JSON Schema (at properties/x/type)"),
    ({"type": "string", "minLength": -1}, "not a valid JSON Schema"),
])
def test_refused_schemas_name_the_reason(schema: Any, needle: str) -> None:
    with pytest.raises(InvalidParameterValue) as exc:
        load_schema(schema, "response_format.json_schema.schema")
    assert needle in exc.value.message
    assert exc.value.message.startswith("response_format.json_schema.schema")


def test_post_validation_catches_what_grammars_do_not_enforce() -> None:
    rf = _rf({"type": "array", "items": {"type": "integer", "multipleOf": 3},
              "uniqueItems": True})
    assert answer_violation("[3, 6]", rf) is None
    assert "non-unique" in (answer_violation("[3, 3]", rf) or "")
    assert "multiple of 3" in (answer_violation("[4]", rf) or "")
    assert "not JSON" in (answer_violation('[3, ', rf) or "")
    assert answer_violation("[1]", {"type": "json_object"}) == "the answer is not a JSON object"
    assert answer_violation("anything", None) is None


def test_tool_parameters_keep_their_defs() -> None:
    plan = ToolPlan([ORDER_TOOL], "required")
    schema = plan.grammar()["schema"]  # type: ignore[index]
    assert schema["$defs"]["fn0"]["properties"]["items"]["items"] == {
        "$ref": "#/$defs/fn0/$defs/Item"}
    call = {"name": "place_order", "arguments": {"customer": "Ann",
                                                  "items": [{"sku": "A1", "qty": 2}]}}
    jsonschema.validate(call, schema)
    jsonschema.validate([call, call], schema)  # parallel calls
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**call, "arguments": {"customer": "Ann",
                                                   "items": [{"sku": "A1", "qty": 0}]}}, schema)
    calls = plan.parse(json.dumps(call))
    assert calls and plan.violation(calls) is None
    bad = plan.parse(json.dumps({**call, "arguments": {"customer": "Ann", "items": []}}))
    assert bad and "place_order" in (plan.violation(bad) or "")


# -- the grammar compiler (engines/grammar.py) ----------------------------------------------
@pytest.fixture(scope="module")
def compiler() -> Iterator[GrammarCompiler]:
    from llama_cpp import Llama

    from fmserve.engines import bundled

    llm = Llama(model_path=str(bundled.smollm2_gguf()), vocab_only=True, verbose=False)
    yield GrammarCompiler(llm._model.vocab, llm.n_vocab())  # the vocab lives with llm
    llm.close()


def _tokens(compiler: GrammarCompiler, text: str) -> list[int]:
    return compiler.tokenizer().tokenize_str(text)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("schema", "needle"), [
    ({"$ref": "https://example.com/other.json"}, "example.com"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "unsatisfiable"),
    ({"type": "object", "patternProperties": {"(?=a)b": {}}}, "look-around"),
    (False, "false"),
])
def test_compile_errors_are_reasons_not_crashes(compiler: GrammarCompiler, schema: Any,
                                                needle: str) -> None:
    with pytest.raises(GrammarError) as exc:
        compiler.matcher({"type": "json_schema", "schema": schema})
    assert needle in str(exc.value).lower()


def test_compile_time_is_bounded(compiler: GrammarCompiler,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fmserve.engines import grammar

    spec = {"type": "json_schema", "schema": {"type": "array", "items": {
        "type": "string", "pattern": "^[a-z]{1,40}@[a-z]{1,40}$"}, "maxItems": 50}}
    monkeypatch.setattr(grammar, "COMPILE_TIMEOUT_S", 0.0)
    with pytest.raises(GrammarError, match="took longer than"):
        compiler.matcher(spec)
    assert not compiler.submit(spec).result().is_error()  # it went on, and was kept


def test_patterns_the_grammar_cannot_run_are_left_to_the_answer_check(
        compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "required": ["code"], "additionalProperties": False,
              "properties": {"code": {"type": "string", "pattern": "^(?!x)[a-z]+$",
                                      "maxLength": 5}}}
    m = compiler.matcher({"type": "json_schema", "schema": schema})
    assert m.consume_tokens(_tokens(compiler, '{"code": "xy"}')) and m.is_accepting()
    assert "does not match" in (answer_violation('{"code": "xy"}', _rf(schema)) or "")
    assert answer_violation('{"code": "ab"}', _rf(schema)) is None


def test_compiled_grammars_are_cached_by_schema(compiler: GrammarCompiler) -> None:
    spec = {"type": "json_schema", "schema": {"type": "object", "required": ["n"],
                                              "properties": {"n": {"type": "integer"}}}}
    before = len(compiler.compile_ms)
    first = compiler.matcher(spec)
    second = compiler.matcher(json.loads(json.dumps(spec)))  # an equal, separate dict
    assert len(compiler.compile_ms) == before + 1  # compiled once
    toks = _tokens(compiler, '{"n": 12}')
    assert first.consume_tokens(toks) and first.is_accepting()
    assert not second.is_accepting()  # copies do not share state
    assert second.validate_tokens(_tokens(compiler, '{"n": "x"}')) < len(toks)


def test_grammar_bounds_and_json_strings(compiler: GrammarCompiler) -> None:
    # 32767 used to nest that many GBNF rules and crash llama.cpp's parser (SIGSEGV).
    big = compiler.matcher({"type": "json_schema",
                            "schema": {"type": "string", "maxLength": 32767}})
    assert big.consume_tokens(_tokens(compiler, '"ok"')) and big.is_accepting()
    # A raw newline inside a JSON string is invalid JSON; the escape is fine.
    s = compiler.matcher({"type": "json_schema", "schema": {"type": "string"}})
    assert s.validate_tokens(_tokens(compiler, '"a\nb"')) < len(_tokens(compiler, '"a\nb"'))
    assert s.consume_tokens(_tokens(compiler, '"a\\nb"')) and s.is_accepting()
    # "\d" inside a character class (once a GBNF parse failure that ran unconstrained).
    digits = compiler.matcher({"type": "json_schema",
                               "schema": {"type": "string", "pattern": "^[\\d-]{3}$"}})
    assert digits.validate_tokens(_tokens(compiler, '"1x3"')) < 3
    assert digits.consume_tokens(_tokens(compiler, '"1-3"')) and digits.is_accepting()
    # A nullable array keeps its items constraint.
    arr = compiler.matcher({"type": "json_schema", "schema": {
        "type": ["array", "null"], "items": {"type": "integer"}}})
    assert arr.validate_tokens(_tokens(compiler, '["a"]')) < len(_tokens(compiler, '["a"]'))
    assert arr.consume_tokens(_tokens(compiler, "[1, 2]")) and arr.is_accepting()


def test_tool_auto_grammar_is_a_call_or_plain_text(compiler: GrammarCompiler) -> None:
    spec = ToolPlan([ORDER_TOOL], "auto").grammar()
    text = compiler.matcher(spec)  # type: ignore[arg-type]
    assert text.consume_tokens(_tokens(compiler, "Hello there")) and text.is_accepting()
    call = compiler.matcher(spec)  # type: ignore[arg-type]
    bad = _tokens(compiler, '{"name": "other"')
    assert call.validate_tokens(bad) < len(bad)


# -- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return openai_for(server)


def _chat_pid(server: Server) -> int:
    return next(w["pid"] for w in server.health()["workers"] if w["entity"] == CHAT)


def test_nested_pydantic_tool_is_enforced_and_the_worker_survives(
        client: OpenAI, server: Server) -> None:
    pid = _chat_pid(server)
    for choice in ("required", {"type": "function", "function": {"name": "place_order"}}):
        r = client.chat.completions.create(
            model=CHAT, tools=[ORDER_TOOL], tool_choice=choice,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Order 2 of sku A1 for Ann."}],
            max_tokens=120, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        jsonschema.validate(json.loads(call.function.arguments), ORDER)
    assert _chat_pid(server) == pid


REAL_WORLD = [
    # numeric bounds and formats, once refused
    {"type": "object", "required": ["age", "score"], "additionalProperties": False,
     "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 30},
                    "score": {"type": "number", "format": "float", "exclusiveMaximum": 1}}},
    # vendor keys and typos are annotations
    {"type": "object", "required": ["name"], "x-kubernetes-preserve-unknown-fields": True,
     "additionalProperties": False,
     "properties": {"name": {"type": "string", "maxLength": 16, "_format": "name"}}},
    # patternProperties with minProperties/maxProperties
    {"type": "object", "patternProperties": {"^[a-z]{1,8}$": {"type": "integer"}},
     "additionalProperties": False, "minProperties": 1, "maxProperties": 3},
    # draft-4 idioms: id, definitions, boolean exclusiveMinimum, dependencies
    {"id": "http://example.com/p", "definitions": {"pos": {"type": "integer", "minimum": 0,
                                                           "exclusiveMinimum": True}},
     "type": "object", "required": ["n"], "properties": {"n": {"$ref": "#/definitions/pos"}},
     "additionalProperties": False},
    # a nullable array with items, the maxLength that crashed llama.cpp
    {"type": "object", "required": ["tags", "note"], "additionalProperties": False,
     "properties": {"tags": {"type": ["array", "null"], "items": {"enum": ["a", "b"]},
                             "maxItems": 3},
                    "note": {"type": "string", "maxLength": 32767, "pattern": "^[\\w ]{1,20}$"}}},
]


@pytest.mark.parametrize("schema", REAL_WORLD, ids=range(len(REAL_WORLD)))
def test_real_world_schemas_are_enforced(client: OpenAI, server: Server,
                                         schema: dict[str, Any]) -> None:
    pid = _chat_pid(server)
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Fill in the JSON."}],
        response_format=_rf(schema), max_tokens=120, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    value = json.loads(r.choices[0].message.content or "")
    assert load_schema(schema, "s").violation(value) is None  # under the schema's draft
    assert _chat_pid(server) == pid


IMPOSSIBLE_UNIQUE = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3,
                     "maxItems": 3, "uniqueItems": True}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_unenforceable_violation_is_an_error_not_an_answer(
        server: Server, temperature: float) -> None:
    body = {"messages": [{"role": "user", "content": "Three letters."}], "max_tokens": 30,
            "temperature": temperature, "response_format": _rf(IMPOSSIBLE_UNIQUE)}
    with server.client() as http:
        r = http.post(f"/serving-endpoints/{CHAT}/invocations", json=body)
        assert r.status_code == 502, r.text
        err = r.json()
        assert err["error_code"] == "BAD_GATEWAY"
        assert "non-unique" in err["message"] and "checked after generation" in err["message"]
        assert f"attempts: {1 if temperature == 0 else 3}" in err["message"]
        # Streamed: the text went out, then an error event instead of the last chunk.
        with http.stream("POST", f"/serving-endpoints/{CHAT}/invocations",
                         json={**body, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data:")]
        assert any("non-unique" in e for e in events)
        assert not any('"finish_reason": "stop"' in e or '"finish_reason":"stop"' in e
                       for e in events)


def test_compile_failure_is_a_400_and_the_worker_survives(server: Server) -> None:
    pid = _chat_pid(server)
    with server.client() as http:
        r = http.post(f"/serving-endpoints/{CHAT}/invocations", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
            "response_format": _rf({"type": "integer", "minimum": 5, "maximum": 3})})
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "cannot be enforced" in r.json()["message"]
    assert _chat_pid(server) == pid


# -- both llama.cpp engines, in this process ------------------------------------------------
PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def _events(engine: Any, msgs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs requests through an engine in this process; each request's events by id."""
    import queue

    from fmserve.engines.worker_main import CancelSet

    events: list[dict[str, Any]] = []
    if hasattr(engine, "run"):
        inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        for msg in msgs:
            inbox.put(msg)
        inbox.put(None)
        engine.run(inbox, CancelSet(), events.append)
    else:
        for msg in msgs:
            engine.handle(msg, events.append, lambda: False)
    by: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        by.setdefault(ev["id"], []).append(ev)
    return by


def _text(evs: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in evs if e["t"] == "tok")


@pytest.mark.parametrize("batched", [False, True])
def test_engines_enforce_grammars_next_to_free_requests(batched: bool) -> None:
    from fmserve.engines import bundled
    from fmserve.engines.llama_batched import BatchedLlamaEngine
    from fmserve.engines.llama_engine import LlamaEngine

    spec = {"model_path": str(bundled.smollm2_gguf()), "n_ctx": 1024, "n_threads": 2}
    engine = BatchedLlamaEngine({**spec, "max_seqs": 4}) if batched else LlamaEngine(spec)
    chat = [{"role": "user", "content": "Describe a person."}]
    grammar = {"type": "json_schema", "schema": PERSON}
    by = _events(engine, [
        {"op": "generate", "id": "json", "messages": chat,
         "params": {"max_tokens": 60, "temperature": 0.7, "grammar": grammar}},
        {"op": "generate", "id": "free", "messages": chat,
         "params": {"max_tokens": 20, "temperature": 0}},
        {"op": "generate", "id": "bad", "messages": chat, "params": {
            "max_tokens": 5, "grammar": {"type": "json_schema", "schema": {
                "type": "integer", "minimum": 5, "maximum": 3}}}},
        {"op": "generate", "id": "again", "messages": chat,  # the cached grammar
         "params": {"max_tokens": 60, "temperature": 0, "grammar": grammar}},
    ])
    for rid in ("json", "again"):
        assert by[rid][-1]["t"] == "end" and by[rid][-1]["finish_reason"] == "stop", by[rid]
        jsonschema.validate(json.loads(_text(by[rid])), PERSON)
    assert by["free"][-1]["t"] == "end" and _text(by["free"])
    assert by["bad"] == [{"t": "err", "id": "bad", "code": "INVALID_PARAMETER_VALUE",
                          "message": "The output schema cannot be enforced: Unsatisfiable "
                                     "schema: minimum (5) is greater than maximum (3)"}]
    assert len(engine.grammars.compile_ms) == 1  # PERSON, once (failures are not kept)


def test_function_calling_dataset_type_names_are_read_as_json_types() -> None:
    bfcl = {"type": "function", "function": {"name": "calc", "description": "BFCL style",
            "parameters": {"type": "dict", "required": ["base", "dims"], "properties": {
                "base": {"type": "float", "description": "The base."},
                "dims": {"type": "tuple", "items": {"type": "integer"}},
                "opts": {"type": "any"}}}}}
    plan = ToolPlan([bfcl], "required")
    params = plan.functions["calc"]
    assert params["type"] == "object" and params["properties"]["base"]["type"] == "number"
    assert params["properties"]["dims"]["type"] == "array"
    assert "type" not in params["properties"]["opts"]
    calls = plan.parse('{"name": "calc", "arguments": {"base": 2.5, "dims": [1, 2]}}')
    assert calls and plan.violation(calls) is None


def test_budget_steering_state_and_narrowing() -> None:
    import numpy as np

    from fmserve.engines.steering import BudgetSteer, ClosingTokens

    pieces = [b'"', b'"}', b"}", b"]}", b'",', b"a", b" {", b'}"', b"[]"]
    closing = ClosingTokens.of(len(pieces), lambda t: pieces[t])
    assert closing.string.tolist() == [True, True] + [False] * 7
    assert closing.value.tolist() == [False, False, True, True] + [False] * 5
    assert closing.short.tolist() == [True] + [False] * 5 + [True, False, True]
    steer = BudgetSteer(closing, budget=23)
    for text in (b'{"', b"a", b'": [', b'{"', b'b\\"', b"c"):  # {"a": [{"b\"c
        steer.after(text)
    assert (steer.depth, steer.in_string, steer.left) == (3, True, 17)
    assert steer.active
    everything = np.ones(len(pieces), dtype=bool)
    assert steer.narrow(everything).tolist() == closing.string.tolist()
    none_close = np.array([False] * 4 + [True] * 5)
    assert steer.narrow(none_close).tolist() == none_close.tolist()  # the grammar's own
    for text in (b'"', b": "):  # {"a": [{"b\"c": — a value is required
        steer.after(text)
    assert steer.narrow(none_close).tolist() == [False] * 6 + [True, False, True]
    plain = BudgetSteer(closing, budget=2)
    plain.after(b"Hello")
    assert not plain.active  # free text is never steered


def test_capped_json_closes_instead_of_breaking() -> None:
    from fmserve.engines import bundled
    from fmserve.engines.llama_batched import BatchedLlamaEngine

    open_schema = {"type": "object", "required": ["name"],
                   "properties": {"name": {"type": "string"}}}  # more properties allowed
    engine = BatchedLlamaEngine({"model_path": str(bundled.smollm2_gguf()), "n_ctx": 1024,
                                 "n_threads": 2, "max_seqs": 2})
    chat = [{"role": "user", "content": "Describe a person in detail, as JSON."}]
    by = _events(engine, [{"op": "generate", "id": "1", "messages": chat, "params": {
        "max_tokens": 24, "temperature": 0,
        "grammar": {"type": "json_schema", "schema": open_schema}}}])
    value = json.loads(_text(by["1"]))
    jsonschema.validate(value, open_schema)
    assert by["1"][-1]["completion_tokens"] <= 24


def test_preload_fills_the_schema_cache_with_both_forms() -> None:
    """What the chat route runs in a thread: later checks on the event loop are hits."""
    from fmserve.protocol import schemas

    params = {"type": "object", "properties": {"n": {"type": "float"}, "k": {"type": "dict"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"when": {"type": "string", "format": "date"}}}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}},
             {"type": "function", "function": {"name": "g"}}, "junk"]
    schemas.preload(schemas.unchecked_schemas(tools, rf))
    for form in (schemas.with_type_aliases(params)[0], rf["json_schema"]["schema"]):
        assert schemas.digest_of(form) in schemas._CACHE
    assert schemas.digest_of(params) not in schemas._CACHE  # "float" is no JSON type
    # Once loaded, only the invalid form is left to check: no thread hop for the rest.
    assert schemas.unchecked_schemas(tools, rf) == [params]
    assert schemas.unchecked_schemas(None, {"type": "json_object"}) == []
    bad = {"type": "json_schema", "json_schema": {"schema": 7}}
    schemas.preload(schemas.unchecked_schemas(None, bad))  # no raise
