"""SCIM 2.0 list queries: filter expressions (RFC 7644 §3.4.2.2), sorting (§3.4.2.3) and
attribute projection (§3.4.2.5). Pure; no I/O; :mod:`fmserve.protocol.scim` re-exports these.

Grammar (a subset of RFC 7644 Figure 1, the part the Databricks SDK, Azure AD and Okta
send)::

    filter    = and *("or" and)                  ; "and" binds tighter than "or"
    and       = unary *("and" unary)
    unary     = "not" "(" filter ")" | "(" filter ")" | attrExp | valuePath
    attrExp   = attrPath "pr" | attrPath compareOp compValue
    valuePath = attrPath "[" filter "]"          ; e.g. emails[type eq "work"]
    compareOp = eq | ne | co | sw | ew | gt | ge | lt | le   ; case-insensitive
    compValue = false | null | true | number | string       ; JSON literals
    attrPath  = [URN ":"] attrName ["." subAttr]             ; case-insensitive

Every malformed filter raises :class:`~fmserve.errors.ScimError` 400 ``invalidFilter``
(a bad sortOrder/sortBy or an over-long attribute list: ``invalidValue``); filters are
bounded (:data:`MAX_FILTER_LENGTH` characters, :data:`MAX_DEPTH` nesting levels).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from fmserve.errors import ScimError

MAX_FILTER_LENGTH = 4096
MAX_DEPTH = 32

_OPS = frozenset({"eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le"})
_CASE_EXACT = frozenset({"id"})  # RFC 7643 §3.1: "id" is caseExact; the rest are not
_NAME_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$\-]*\Z")
_TOKEN_RE = re.compile(
    r"(?:(?P<punct>[()\[\]])|(?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"|(?P<word>[A-Za-z_$][A-Za-z0-9_$:.\-]*)|(?P<str>\"))"
)


def _bad(detail: str) -> ScimError:
    return ScimError(400, detail, "invalidFilter")


def split_attr_path(raw: str) -> tuple[str, ...] | None:
    """``"urn:...:User:name.givenName"`` → ``("name", "givenname")``; None if malformed.

    The schema URN prefix is dropped; names are lower-cased; at most one sub-attribute.
    """
    if raw[:4].lower() == "urn:":
        raw = raw.rsplit(":", 1)[1]
    parts = raw.split(".")
    if len(parts) > 2 or not all(_NAME_RE.match(p) for p in parts):
        return None
    return tuple(p.lower() for p in parts)


def lookup(obj: dict[str, Any], name: str) -> tuple[bool, Any]:
    """Case-insensitive key lookup: ``(found, value)``; ``name`` is lower-case."""
    if name in obj:
        return True, obj[name]
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() == name:
            return True, value
    return False, None


def resolve(obj: dict[str, Any], parts: tuple[str, ...]) -> list[Any]:
    """The values at ``parts`` in ``obj``, flattened over multi-valued attributes.

    A list of complex values without a sub-attribute yields each element's ``value``
    (so ``members eq "123"`` compares member ids); null and missing yield nothing.
    """
    found, value = lookup(obj, parts[0])
    if not found or value is None:
        return []
    rest = parts[1:]
    out: list[Any] = []
    for item in value if isinstance(value, list) else [value]:
        if rest:
            if isinstance(item, dict):
                out.extend(resolve(item, rest))
        elif isinstance(item, dict) and isinstance(value, list):
            out.extend(resolve(item, ("value",)))
        elif item is not None:
            out.append(item)
    return out


class Filter:
    """A parsed filter; :meth:`matches` tests one resource (a SCIM JSON dict)."""

    def matches(self, resource: dict[str, Any]) -> bool:
        raise NotImplementedError


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "num"
    return "str" if isinstance(v, str) else "other"


@dataclass(frozen=True)
class Compare(Filter):
    """``attrPath op value``; ``path`` is lower-case parts, ``op`` lower-case."""

    path: tuple[str, ...]
    op: str
    value: Any

    def matches(self, resource: dict[str, Any]) -> bool:
        values = resolve(resource, self.path)
        if self.value is None:  # "eq null" means absent, "ne null" present
            return (not values) == (self.op == "eq")
        if self.op == "ne":
            return not any(self._test("eq", v) for v in values)
        return any(self._test(self.op, v) for v in values)

    def _test(self, op: str, actual: Any) -> bool:
        want = self.value
        if _kind(actual) != _kind(want) or _kind(want) == "other":
            return False
        if isinstance(want, str) and self.path[-1] not in _CASE_EXACT:
            actual, want = actual.casefold(), want.casefold()
        if op == "eq":
            return bool(actual == want)
        if op in ("co", "sw", "ew"):
            return {"co": want in actual, "sw": actual.startswith(want),
                    "ew": actual.endswith(want)}[op]
        return {"gt": actual > want, "ge": actual >= want,
                "lt": actual < want, "le": actual <= want}[op]


@dataclass(frozen=True)
class Present(Filter):
    """``attrPath pr``: the attribute has a non-empty value (RFC 7644 §3.4.2.2)."""

    path: tuple[str, ...]

    def matches(self, resource: dict[str, Any]) -> bool:
        return any(v not in ("", [], {}) for v in resolve(resource, self.path))


@dataclass(frozen=True)
class ValuePath(Filter):
    """``attr[filter]``: some element of the (multi-valued) complex attribute matches."""

    attr: str
    inner: Filter

    def matches(self, resource: dict[str, Any]) -> bool:
        found, value = lookup(resource, self.attr)
        items = value if isinstance(value, list) else [value] if found else []
        return any(isinstance(el, dict) and self.inner.matches(el) for el in items)


@dataclass(frozen=True)
class And(Filter):
    parts: tuple[Filter, ...]

    def matches(self, resource: dict[str, Any]) -> bool:
        return all(p.matches(resource) for p in self.parts)


@dataclass(frozen=True)
class Or(Filter):
    parts: tuple[Filter, ...]

    def matches(self, resource: dict[str, Any]) -> bool:
        return any(p.matches(resource) for p in self.parts)


@dataclass(frozen=True)
class Not(Filter):
    inner: Filter

    def matches(self, resource: dict[str, Any]) -> bool:
        return not self.inner.matches(resource)


@dataclass(frozen=True)
class _Tok:
    kind: str  # "punct" | "num" | "word" | "str"
    text: str
    value: Any = None


def _tokenize(expr: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, end = 0, len(expr)
    while True:
        while pos < end and expr[pos].isspace():
            pos += 1
        if pos >= end:
            return toks
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise _bad(f"unexpected character {expr[pos]!r} at position {pos}")
        kind = m.lastgroup or ""
        if kind != "str":
            text = m.group(kind)
            value: Any = None
            if kind == "num":
                value = float(text) if any(c in text for c in ".eE") else int(text)
            toks.append(_Tok(kind, text, value))
            pos = m.end()
            continue
        start = m.end() - 1
        i = start + 1
        while i < end and expr[i] != '"':
            i += 2 if expr[i] == "\\" else 1
        if i >= end:
            raise _bad(f"unterminated string starting at position {start}")
        raw = expr[start:i + 1]
        try:
            decoded = json.loads(raw)
        except ValueError:
            raise _bad(f"invalid string literal {raw!r}") from None
        toks.append(_Tok("str", raw, decoded))
        pos = i + 1


class _Parser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self, what: str) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise _bad(f"filter ends where {what} was expected")
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "word" and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    def expect(self, punct: str) -> None:
        tok = self.next(repr(punct))
        if tok.kind != "punct" or tok.text != punct:
            raise _bad(f"expected {punct!r}, found {tok.text!r}")

    def parse_or(self, depth: int, in_brackets: bool) -> Filter:
        parts = [self.parse_and(depth, in_brackets)]
        while self.keyword("or"):
            parts.append(self.parse_and(depth, in_brackets))
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def parse_and(self, depth: int, in_brackets: bool) -> Filter:
        parts = [self.parse_unary(depth, in_brackets)]
        while self.keyword("and"):
            parts.append(self.parse_unary(depth, in_brackets))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def parse_unary(self, depth: int, in_brackets: bool) -> Filter:
        if depth > MAX_DEPTH:
            raise _bad(f"filter nested deeper than {MAX_DEPTH} levels")
        if self.keyword("not"):
            self.expect("(")
            inner = self.parse_or(depth + 1, in_brackets)
            self.expect(")")
            return Not(inner)
        tok = self.next("an attribute, 'not' or '('")
        if tok.kind == "punct" and tok.text == "(":
            inner = self.parse_or(depth + 1, in_brackets)
            self.expect(")")
            return inner
        if tok.kind != "word":
            raise _bad(f"expected an attribute name, found {tok.text!r}")
        path = split_attr_path(tok.text)
        if path is None:
            raise _bad(f"invalid attribute path {tok.text!r}")
        nxt = self.peek()
        if nxt is not None and nxt.kind == "punct" and nxt.text == "[":
            if in_brackets or len(path) != 1:
                raise _bad(f"invalid value filter on {tok.text!r}")
            self.i += 1
            inner = self.parse_or(depth + 1, True)
            self.expect("]")
            return ValuePath(path[0], inner)
        return self.parse_comparison(path, tok.text)

    def parse_comparison(self, path: tuple[str, ...], raw: str) -> Filter:
        optok = self.next(f"an operator after {raw!r}")
        op = optok.text.lower()
        if optok.kind == "word" and op == "pr":
            return Present(path)
        if optok.kind != "word" or op not in _OPS:
            raise _bad(f"unknown operator {optok.text!r}")
        vtok = self.next(f"a value after {optok.text!r}")
        literals = {"true": True, "false": False, "null": None}
        if vtok.kind in ("str", "num"):
            value = vtok.value
        elif vtok.kind == "word" and vtok.text.lower() in literals:
            value = literals[vtok.text.lower()]
        else:
            raise _bad(f"expected a value after {optok.text!r}, found {vtok.text!r}")
        if op in ("co", "sw", "ew") and not isinstance(value, str):
            raise _bad(f"operator {op!r} needs a string value")
        if op in ("gt", "ge", "lt", "le") and (value is None or isinstance(value, bool)):
            raise _bad(f"operator {op!r} needs a string or number value")
        if value is None and op not in ("eq", "ne"):
            raise _bad(f"operator {op!r} cannot compare with null")
        return Compare(path, op, value)


def parse_filter(expr: str) -> Filter:
    """Parse an RFC 7644 §3.4.2.2 filter, e.g. ``userName eq "a@b.com" and active eq true``.

    Raises ScimError 400 ``invalidFilter`` for anything malformed: empty input, more than
    :data:`MAX_FILTER_LENGTH` characters or :data:`MAX_DEPTH` nesting levels, an unknown
    operator, a missing value, an unterminated string, or trailing tokens.
    """
    if not isinstance(expr, str):
        raise _bad("filter must be a string")
    if len(expr) > MAX_FILTER_LENGTH:
        raise _bad(f"filter longer than {MAX_FILTER_LENGTH} characters")
    if not expr.strip():
        raise _bad("filter is empty")
    parser = _Parser(_tokenize(expr))
    result = parser.parse_or(0, False)
    extra = parser.peek()
    if extra is not None:
        raise _bad(f"unexpected {extra.text!r} after a complete filter")
    return result


# ---- §3.4.2.3 sorting, §3.4.2.5 projection ----------------------------------------------

def _sort_key(resource: dict[str, Any], parts: tuple[str, ...]) -> tuple[int, Any] | None:
    _, value = lookup(resource, parts[0])
    elems = [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []
    if elems:  # multi-valued: the primary element, else the first
        first = next((e for e in elems if e.get("primary") is True), elems[0])
        values = resolve(first, parts[1:] or ("value",))
    else:
        values = resolve(resource, parts)
    for v in values:
        if isinstance(v, bool):
            return (0, v)
        if isinstance(v, int | float):
            return (1, v)
        if isinstance(v, str):
            return (2, v if parts[-1] == "id" else v.casefold())
    return None


def sort_resources(resources: list[dict[str, Any]], sort_by: str | None,
                   sort_order: str | None) -> list[dict[str, Any]]:
    """RFC 7644 §3.4.2.3: a new list sorted by the attribute path ``sort_by`` (e.g.
    ``"userName"``, ``"name.familyName"``; case-insensitive; strings compared case-
    insensitively; a multi-valued attribute sorts by its primary or first element).

    ``sort_order`` is ``"ascending"`` (default) or ``"descending"``; resources without the
    attribute come last either way; the sort is stable. ``sort_by=None`` keeps the order.
    Raises ScimError 400 ``invalidValue`` for another sortOrder or a malformed sortBy.
    """
    order = (sort_order or "ascending").lower()
    if order not in ("ascending", "descending"):
        raise ScimError(400, f"sortOrder must be 'ascending' or 'descending', "
                             f"not {sort_order!r}", "invalidValue")
    if not sort_by:
        return list(resources)
    parts = split_attr_path(sort_by.strip()) if len(sort_by) <= 256 else None
    if parts is None:
        raise ScimError(400, f"invalid sortBy {sort_by[:256]!r}", "invalidValue")
    keyed = [(_sort_key(r, parts), r) for r in resources]
    present = [(k, r) for k, r in keyed if k is not None]
    present.sort(key=lambda kr: kr[0], reverse=order == "descending")
    return [r for _, r in present] + [r for k, r in keyed if k is None]


def _attr_spec(names: str) -> dict[str, set[str] | None]:
    """``"userName,name.givenName"`` → ``{"username": None, "name": {"givenname"}}``."""
    if len(names) > 4096:
        raise ScimError(400, "attribute list longer than 4096 characters", "invalidValue")
    spec: dict[str, set[str] | None] = {}
    for raw in names.split(","):
        parts = split_attr_path(raw.strip()) if raw.strip() else None
        if parts is None:
            continue  # unknown or malformed names are ignored
        if len(parts) == 1:
            spec[parts[0]] = None
        else:
            subs = spec.setdefault(parts[0], set())
            if subs is not None:
                subs.add(parts[1])
    return spec


def _pick(value: Any, subs: set[str], keep: bool) -> Any:
    def one(d: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in d.items()
                if (isinstance(k, str) and k.lower() in subs) == keep}
    if isinstance(value, dict):
        return one(value)
    if isinstance(value, list):
        return [one(e) if isinstance(e, dict) else copy.deepcopy(e) for e in value]
    return copy.deepcopy(value) if not keep else None


def project(resource: dict[str, Any], attributes: str | None,
            excluded_attributes: str | None) -> dict[str, Any]:
    """RFC 7644 §3.4.2.5: a deep copy of ``resource`` with only the comma-separated
    ``attributes`` (when given), then without the ``excluded_attributes``. Names are case-
    insensitive and may name sub-attributes (``name.givenName``, ``emails.value``); unknown
    names are ignored; ``id`` and ``schemas`` are always returned.
    """
    out: dict[str, Any] = {}
    include = _attr_spec(attributes) if attributes else None
    exclude = _attr_spec(excluded_attributes) if excluded_attributes else {}
    for key, value in resource.items():
        low = key.lower() if isinstance(key, str) else key
        always = low in ("id", "schemas")
        if include is not None and not always and low not in include:
            continue
        subs = include.get(low) if include is not None and not always else None
        if subs is not None:
            value = _pick(value, subs, True)
            if value in (None, {}, []) or (isinstance(value, list) and not any(value)):
                continue
        else:
            value = copy.deepcopy(value)
        if not always and low in exclude:
            drop = exclude[low]
            if drop is None:
                continue
            value = _pick(value, drop, False)
        out[key] = value
    return out
