"""From a grammar spec to llguidance grammar text (pure; runs inside a worker).

Grammar specs come from :mod:`fmserve.engines.structured`:

* ``{"type": "json_object"}`` — any JSON object;
* ``{"type": "json_schema", "schema": S}`` — JSON conforming to ``S``;
* ``{"type": "tool_auto", "schema": S}`` — a call conforming to ``S``, or free text
  whose first character is not ``{``, ``[`` or white space (a Lark grammar with an
  inline ``%json`` rule).

The grammar is built from the schema's *grammar view* (:func:`grammar_view`):
annotations, unknown keywords and the keywords llguidance 1.9 does not implement
(:data:`UNENFORCED`) are left out, and where llguidance still refuses the view a
looser one is tried (:class:`Relax`: patterns it cannot run, recursive ``$ref``s it
cannot merge). Everything left out is enforced by the check of the finished answer
(:meth:`fmserve.protocol.schemas.OutputSchema.violation`). JSON is generated
compactly (``", "`` and ``": "`` separators, no other white space: a small model
cannot run away in newlines) and ``oneOf`` is matched as ``anyOf``
(llguidance's JSON options, https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fmserve.protocol.schemas import KEYWORDS, rebuild

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "coerce_one_of": True, "lenient": True}
# Free text for tool_choice "auto": anything that does not open a JSON value.
_FREE_TEXT = r"/[^{\[\s][\s\S]*/"



class GrammarError(ValueError):
    """A grammar spec that cannot be compiled or enforced; the message says why."""


# Left out of the grammar's copy of a schema: keywords that constrain nothing, and
# those llguidance 1.9 does not implement ("Unimplemented keys"), which the answer
# check enforces instead.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment",
                          "deprecated", "readOnly", "writeOnly", "contentEncoding",
                          "contentMediaType", "contentSchema"})
UNENFORCED = frozenset({"not", "if", "then", "else", "dependencies", "dependentSchemas",
                        "dependentRequired", "contains", "minContains", "maxContains",
                        "unevaluatedItems", "unevaluatedProperties", "propertyNames",
                        "uniqueItems", "$dynamicAnchor", "$dynamicRef", "$recursiveRef",
                        "$recursiveAnchor"})
_LEFT_OUT = _ANNOTATIONS | UNENFORCED


@dataclass(frozen=True)
class Relax:
    """What the grammar leaves to the answer check when llguidance refuses it.

    Attributes:
        patterns: ``pattern`` regexes it cannot run (look-around, back-references).
        bare_refs: ``$ref`` siblings and the other members of an ``allOf`` holding a
            ``$ref`` are dropped (it cannot merge them with a recursive ref).
    """

    patterns: frozenset[str] = frozenset()
    bare_refs: bool = False


def grammar_view(schema: Any, relax: Relax = Relax()) -> Any:
    """The copy of a schema the grammar is built from.

    * annotations go, and so do unknown keywords and ``$schema`` below the root
      (they constrain nothing; a root-level unknown key may hold definitions that
      ``$ref``s point to), and the keywords of :data:`UNENFORCED`;
    * a ``$ref`` with sibling constraints becomes ``allOf: [{"$ref"}, {siblings}]``
      (their 2019-09+ meaning); with ``relax.bare_refs`` it stays a bare ``$ref``, an
      ``allOf`` with a ``$ref`` member becomes its first such member, and an
      ``anyOf``/``oneOf`` with one loses its sibling keywords;
    * the ``pattern``s in ``relax.patterns`` go.

    Whatever goes is still checked on the finished answer.
    """
    def view(obj: dict[str, Any], path: str) -> dict[str, Any]:
        out = {k: v for k, v in obj.items()
               if (k in KEYWORDS or not path) and k not in _LEFT_OUT
               and not (k == "pattern" and v in relax.patterns)
               and not (k == "$schema" and path)}
        if relax.bare_refs:  # a recursive ref cannot be merged with anything
            if isinstance(out.get("allOf"), list):
                refs = [m for m in out["allOf"] if isinstance(m, dict) and "$ref" in m]
                if refs:
                    out = {**{k: v for k, v in out.items() if k != "allOf"}, **refs[0]}
            for key in ("anyOf", "oneOf"):
                if isinstance(out.get(key), list) and any(
                        isinstance(m, dict) and "$ref" in m for m in out[key]):
                    out = {k: v for k, v in out.items()
                           if k in (key, "$defs", "definitions") or not path}
        if "$ref" in out and len(out) > 1:
            keep = {k: out.pop(k) for k in list(out)
                    if k in ("$defs", "definitions") or (not path and (
                        k == "$schema" or k not in KEYWORDS))}
            ref = {"$ref": out.pop("$ref")}
            out = {**keep, **({"allOf": [ref, out]} if out and not relax.bare_refs else ref)}
        return out

    return rebuild(schema, view)


def _patterns(schema: Any) -> set[str]:
    found: set[str] = set()

    def collect(obj: dict[str, Any], _: str) -> dict[str, Any]:
        if isinstance(obj.get("pattern"), str):
            found.add(obj["pattern"])
        return obj

    rebuild(schema, collect)
    return found


def unsupported_patterns(schema: Any) -> frozenset[str]:
    """The ``pattern`` regexes of ``schema`` that llguidance cannot compile."""
    from llguidance import LLMatcher

    return frozenset(p for p in _patterns(schema) if LLMatcher.validate_grammar(
        LLMatcher.grammar_from_json_schema({"type": "string", "pattern": p})))


def _with_options(schema: Any, relax: Relax = Relax()) -> dict[str, Any]:
    if schema is True:
        schema = {}
    if schema is False:
        raise GrammarError("the schema is `false`: no value can satisfy it")
    return {**grammar_view(schema, relax), "x-guidance": JSON_OPTIONS}


def grammar_text(spec: dict[str, Any], relax: Relax = Relax()) -> str:
    """The llguidance grammar (its JSON text) for a grammar spec (see module doc).

    Raises:
        GrammarError: an unknown spec type, or a ``false`` schema.
    """
    from llguidance import LLMatcher

    kind = spec.get("type")
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema(_with_options({"type": "object"}))
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(_with_options(spec["schema"], relax))
    if kind == "tool_auto":
        call = json.dumps(_with_options(spec["schema"], relax), ensure_ascii=False)
        return LLMatcher.grammar_from_lark(
            f"start: call | free\ncall: %json {call}\nfree: {_FREE_TEXT}\n")
    raise GrammarError(f"unknown grammar type {kind!r}")


def relaxed(spec: dict[str, Any], relax: Relax, error: str) -> Relax | None:
    """A looser view after llguidance refused this one with ``error``, or None."""
    if "schema" not in spec:
        return None
    if "regex parse error" in error and not relax.patterns:
        patterns = unsupported_patterns(spec["schema"])
        return replace(relax, patterns=patterns) if patterns else None
    if "circular references with sibling keys" in error and not relax.bare_refs:
        return replace(relax, bare_refs=True)
    return None
