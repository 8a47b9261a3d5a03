"""JSON Schemas of structured outputs and tool parameters: checked once, one home.

A request's ``response_format.json_schema.schema`` and each tool's
``function.parameters`` are loaded with :func:`load_schema` into an
:class:`OutputSchema`, used by local engines (grammar-constrained decoding, then a
check of the finished answer) and by external providers (a check of the provider's
answer), so both read a schema the same way:

* **Draft.** The metaschema the schema names in ``$schema`` (draft 4, 6, 7, 2019-09,
  2020-12); a schema that names none (or an unknown one) is checked against
  2020-12, then draft 7, then draft 4, and the first it conforms to validates the
  answers — real-world schemas are written against all three
  (https://json-schema.org/specification-links).
* **Ignored keywords.** A keyword no JSON Schema draft defines (vendor extensions
  such as ``x-kubernetes-…``, typos such as ``_format`` or ``optional``) is an
  annotation and constrains nothing (JSON Schema 2020-12 Core §6.5, "unknown
  keywords SHOULD be treated as annotations"). :attr:`OutputSchema.ignored` lists
  them as JSON-pointer-like paths, for the log.
* **Answers.** :meth:`OutputSchema.violation` validates a parsed answer with the
  chosen draft's validator (``format`` is an annotation, as in 2020-12) and names the
  first failing path; a grammar cannot enforce every keyword (``uniqueItems``,
  ``multipleOf``, ``not``, ``if``/``then``…), so every finished answer is checked.

Raises :class:`~fmserve.errors.InvalidParameterValue` (400) for a schema that is not
an object or boolean, or that no draft's metaschema accepts.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema import Draft4Validator, Draft7Validator, Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from fmserve.errors import InvalidParameterValue

# Every keyword of drafts 4 to 2020-12 (core, applicator, validation, meta-data,
# format, content, unevaluated). Anything else in a schema object is ignored.
KEYWORDS = frozenset({
    "$schema", "$id", "id", "$ref", "$defs", "definitions", "$anchor", "$dynamicRef",
    "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$vocabulary", "$comment",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas",
    "dependencies", "prefixItems", "items", "additionalItems", "contains", "properties",
    "patternProperties", "additionalProperties", "propertyNames", "unevaluatedItems",
    "unevaluatedProperties", "type", "enum", "const", "multipleOf", "maximum",
    "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern",
    "maxItems", "minItems", "uniqueItems", "maxContains", "minContains", "maxProperties",
    "minProperties", "required", "dependentRequired", "title", "description", "default",
    "deprecated", "readOnly", "writeOnly", "examples", "format", "contentEncoding",
    "contentMediaType", "contentSchema",
})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("not", "if", "then", "else", "additionalItems", "additionalProperties",
               "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
               "contentSchema")
# Drafts tried, in order, for a schema whose $schema names none we know.
_FALLBACK_DRAFTS = (Draft202012Validator, Draft7Validator, Draft4Validator)


@dataclass(frozen=True)
class OutputSchema:
    """A checked JSON Schema.

    Attributes:
        schema: the schema as sent (a dict or a boolean).
        digest: sha256 hex of its canonical JSON (sorted keys): the cache key of the
            compiled grammar and of this object.
        draft: the validator class's name, e.g. ``"Draft202012Validator"``.
        ignored: paths of keywords no draft defines (``"properties.x._format"``).
    """

    schema: Any
    digest: str
    draft: str
    ignored: tuple[str, ...]
    _validator: Any = field(repr=False, compare=False)

    def violation(self, value: Any) -> str | None:
        """``None`` when ``value`` (parsed JSON) conforms, else ``"at <path>: <why>"``."""
        err = best_match(self._validator.iter_errors(value))
        if err is None:
            return None
        path = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"at {path}: {err.message[:300]}"


def canonical(value: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces): equal schemas, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_of(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


_CACHE: OrderedDict[str, OutputSchema] = OrderedDict()
_CACHE_SIZE = 256


def load_schema(schema: Any, where: str) -> OutputSchema:
    """Checks ``schema`` (see module doc); cached by canonical digest.

    Raises:
        InvalidParameterValue: not an object/boolean, or invalid under every draft tried;
            the message names ``where`` and the metaschema's complaint.
    """
    if not isinstance(schema, (dict, bool)):
        raise InvalidParameterValue(f"{where} must be a JSON Schema object.")
    key = digest_of(schema)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    cls = _draft_for(schema, where)
    ignored: list[str] = []
    _unknown_keywords(schema, "", ignored)
    out = OutputSchema(schema, key, cls.__name__, tuple(ignored), cls(schema))
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def _draft_for(schema: Any, where: str) -> Any:
    declared = None
    if isinstance(schema, dict) and isinstance(schema.get("$schema"), str):
        declared = jsonschema.validators.validator_for(schema, default=None)
    tried = (declared,) if declared is not None else _FALLBACK_DRAFTS
    first: SchemaError | None = None
    for cls in tried:
        try:
            cls.check_schema(schema)
            return cls
        except SchemaError as exc:
            first = first or exc
        except RecursionError:
            raise InvalidParameterValue(f"{where} is nested too deeply.") from None
    assert first is not None
    path = "/".join(str(p) for p in first.absolute_path)
    at = f" (at {path})" if path else ""
    raise InvalidParameterValue(f"{where} is not a valid JSON Schema{at}: "
                                f"{first.message[:300]}")


def rebuild(node: Any, fn: Callable[[dict[str, Any], str], Any], path: str = "") -> Any:
    """A copy of a schema rebuilt bottom-up: ``fn(schema_object, path)`` is applied to
    every schema object (its subschemas already rebuilt) and returns its replacement.

    Only schema positions are visited (``properties`` values, ``items``, ``anyOf``
    members, ...); ``enum``/``const``/``default`` values and unknown keywords are data.
    ``path`` is JSON-pointer-like: ``properties.a.items[0]``.
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        here = f"{path}.{key}" if path else key
        if key in (*_SCHEMA_MAPS, "dependencies") and isinstance(value, dict):
            out[key] = {name: rebuild(sub, fn, f"{here}.{name}") for name, sub in value.items()}
        elif (key in _SCHEMA_LISTS or key == "items") and isinstance(value, list):
            out[key] = [rebuild(sub, fn, f"{here}[{i}]") for i, sub in enumerate(value)]
        elif key in _SCHEMA_ONE or key == "items":
            out[key] = rebuild(value, fn, here)
        else:
            out[key] = value
    return fn(out, path)


def _unknown_keywords(node: Any, path: str, out: list[str]) -> None:
    def collect(obj: dict[str, Any], here: str) -> dict[str, Any]:
        out.extend(f"{here}.{k}" if here else k for k in obj if k not in KEYWORDS)
        return obj

    rebuild(node, collect, path)


# Type names of function-calling datasets written in Python/Java terms (BFCL's "dict",
# "float", "tuple", ...) and their JSON Schema types; None: any type.
TYPE_ALIASES: dict[str, str | None] = {
    "dict": "object", "map": "object", "hashmap": "object", "float": "number",
    "double": "number", "decimal": "number", "int": "integer", "long": "integer",
    "short": "integer", "byte": "integer", "bigint": "integer", "bool": "boolean",
    "str": "string", "char": "string", "list": "array", "tuple": "array",
    "arraylist": "array", "set": "array", "any": None,
}


def with_type_aliases(schema: Any) -> tuple[Any, list[str]]:
    """``schema`` with :data:`TYPE_ALIASES` (any case) replaced by JSON Schema types, and
    the paths it changed; for tool parameters written for function-calling datasets."""
    changed: list[str] = []

    def fix(obj: dict[str, Any], path: str) -> dict[str, Any]:
        t = obj.get("type")
        names = [n for n in (t if isinstance(t, list) else [t]) if isinstance(n, str)]
        if not any(n not in _JSON_TYPES and n.lower() in TYPE_ALIASES for n in names):
            return obj
        mapped = [n if n in _JSON_TYPES else TYPE_ALIASES.get(n.lower(), n) for n in names]
        changed.append(f"{path}.type" if path else "type")
        out = {k: v for k, v in obj.items() if k != "type"}
        if None not in mapped:
            types = list(dict.fromkeys(mapped))
            out["type"] = types[0] if len(types) == 1 else types
        return out

    return rebuild(schema, fix), changed


_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def ref_rooted(schema: Any, base: str) -> Any:
    """A copy of ``schema`` whose local ``$ref``s (``#``, ``#/…``) point below ``base``.

    Used to nest a whole schema (a tool's ``parameters`` with its ``$defs``) under
    ``#/$defs/<name>`` of a larger one: ``{"$ref": "#/$defs/Item"}`` becomes
    ``{"$ref": "#/$defs/<name>/$defs/Item"}``. Nested, the part is no longer a document
    of its own: its ``$schema`` and ``$id`` go.
    """
    def reroot(obj: dict[str, Any], _: str) -> dict[str, Any]:
        out = {}
        for key, value in obj.items():
            if key in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(value, str) \
                    and value.startswith("#"):
                out[key] = base + value[1:]
            elif not (key in ("$schema", "$id", "id") and isinstance(value, str)):
                out[key] = value
        return out

    return rebuild(schema, reroot)


def unchecked_schemas(tools: Any, response_format: Any) -> list[Any]:
    """The schemas of a chat request not yet in the cache of :func:`load_schema`:
    ``response_format.json_schema.schema`` and each tool's ``function.parameters``, as
    sent and with :data:`TYPE_ALIASES` read (local engines read that form). Cheap: a
    digest each, no metaschema check."""
    found: list[Any] = []
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        found.append(response_format["json_schema"].get("schema"))
    for tool in tools if isinstance(tools, list) else ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict):
            found.append(fn.get("parameters"))
    out: list[Any] = []
    for schema in found:
        if isinstance(schema, (dict, bool)):
            out.extend(form for form in (schema, with_type_aliases(schema)[0])
                       if digest_of(form) not in _CACHE)
    return out


def preload(schemas: list[Any]) -> None:
    """Loads ``schemas`` (from :func:`unchecked_schemas`) into the cache of
    :func:`load_schema`, so the request path finds them checked.

    The metaschema check of a large schema takes hundreds of ms of pure Python; callers
    run this in a thread (``asyncio.to_thread``) so the event loop keeps serving. Errors
    are not raised here: the request path raises them, with its own messages.
    """
    for form in schemas:
        try:
            load_schema(form, "schema")
        except (InvalidParameterValue, RecursionError):
            continue
