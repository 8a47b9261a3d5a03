"""The workspace SCIM 2.0 subset databricks-sdk's UsersAPI, ServicePrincipalsAPI and GroupsAPI
use (``/api/2.0/preview/scim/v2/{Users,ServicePrincipals,Groups}``). Pure functions on SCIM
JSON dicts; no I/O.

- filtering :func:`parse_filter` (RFC 7644 §3.4.2.2), sorting :func:`sort_resources`
  (§3.4.2.3) and projection :func:`project` (§3.4.2.5), from :mod:`.scim_filter`;
- paging: :func:`parse_paging`, :func:`list_response` (§3.4.2.4); a whole list request
  at once: :func:`query` (§3.4.2);
- PATCH: :func:`apply_patch` (§3.5.2); create/PUT bodies: :func:`check_resource`
  (§3.3, §3.5.1; attribute types per RFC 7643 §4).

Every bad input raises :class:`~fmserve.errors.ScimError` 400 with an RFC 7644 §3.12
``scimType`` (``invalidFilter``, ``invalidSyntax``, ``invalidPath``, ``invalidValue``,
``noTarget``, ``mutability``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fmserve.errors import ScimError
from fmserve.protocol.scim_filter import (
    Compare,
    Filter,
    parse_filter,
    project,
    sort_resources,
)

__all__ = [
    "GROUP_ATTRIBUTES", "GROUP_SCHEMAS", "LIST_SCHEMA", "MAX_COUNT", "PATCH_SCHEMA",
    "SP_ATTRIBUTES", "SP_SCHEMAS", "USER_ATTRIBUTES", "USER_SCHEMAS", "Filter",
    "apply_patch", "check_resource", "list_response", "parse_filter", "parse_paging",
    "project", "query", "sort_resources",
]

USER_SCHEMAS = ["urn:ietf:params:scim:schemas:core:2.0:User",
                "urn:ietf:params:scim:schemas:extension:workspace:2.0:User"]
SP_SCHEMAS = ["urn:ietf:params:scim:schemas:core:2.0:ServicePrincipal"]
GROUP_SCHEMAS = ["urn:ietf:params:scim:schemas:core:2.0:Group"]
LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
MAX_COUNT = 10000  # most resources one page returns

USER_ATTRIBUTES = frozenset({"id", "userName", "displayName", "active", "emails", "name",
                             "entitlements", "groups", "roles", "externalId", "schemas", "meta"})
SP_ATTRIBUTES = frozenset({"id", "applicationId", "displayName", "active", "entitlements",
                           "groups", "roles", "externalId", "schemas", "meta"})
GROUP_ATTRIBUTES = frozenset({"id", "displayName", "members", "groups", "entitlements", "roles",
                              "externalId", "schemas", "meta"})
_KINDS = {"Users": (USER_ATTRIBUTES, USER_SCHEMAS),
          "ServicePrincipals": (SP_ATTRIBUTES, SP_SCHEMAS),
          "Groups": (GROUP_ATTRIBUTES, GROUP_SCHEMAS)}
_DEFAULT_IMMUTABLE = frozenset({"id", "userName", "applicationId", "schemas", "meta"})

_ATTRS = {a.lower(): a for a in USER_ATTRIBUTES | SP_ATTRIBUTES | GROUP_ATTRIBUTES}
_MULTI = frozenset({"emails", "entitlements", "groups", "members", "roles"})
_NAME_SUBS = {"givenname": "givenName", "familyname": "familyName"}
_ITEM_SUBS = {"value": "value", "display": "display", "$ref": "$ref", "type": "type",
              "primary": "primary"}
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
_PATH_RE = re.compile(r"(?P<attr>[A-Za-z_$][\w$:.\-]*?)"
                      r"(?:\[(?P<filter>.*)\](?:\.(?P<sub>[A-Za-z_$][\w$\-]*))?)?\Z",
                      re.ASCII | re.DOTALL)
_INT_RE = re.compile(r"[+-]?\d{1,18}\Z")


def _err(scim_type: str, detail: str) -> ScimError:
    return ScimError(400, detail, scim_type)


# ---- §3.4.2.4 paging -------------------------------------------------------------------

def parse_paging(params: Mapping[str, str]) -> tuple[int | None, int | None]:
    """``startIndex`` and ``count`` from query parameters (names case-insensitive) as
    ``(start_index, count)``, None where absent. Raises ScimError 400 ``invalidValue``
    for a value that is not an integer.
    """
    found: dict[str, int | None] = {"startindex": None, "count": None}
    for key, raw in params.items():
        if isinstance(key, str) and key.lower() in found:
            text = raw.strip() if isinstance(raw, str) else ""
            if not _INT_RE.match(text):
                raise _err("invalidValue", f"{key} must be an integer, not {str(raw)[:64]!r}")
            found[key.lower()] = int(text)
    return found["startindex"], found["count"]


def list_response(resources: list[dict[str, Any]], start_index: int | None,
                  count: int | None) -> dict[str, Any]:
    """RFC 7644 §3.4.2.4 ListResponse for the page of ``resources`` (already filtered and
    sorted) starting at the 1-based ``start_index`` (None or < 1 means 1) with at most
    ``count`` items (None: all; negative: 0; capped at :data:`MAX_COUNT`)::

        {"schemas": [LIST_SCHEMA], "totalResults": n, "startIndex": s,
         "itemsPerPage": k, "Resources": [...]}

    Past the end ``Resources`` is ``[]``: databricks-sdk's ``list()`` requests pages,
    advancing ``startIndex`` by ``len(Resources)``, until one comes back empty.
    """
    start = max(1, start_index) if start_index is not None else 1
    limit = MAX_COUNT if count is None else min(max(0, count), MAX_COUNT)
    page = resources[start - 1:start - 1 + limit]
    return {"schemas": [LIST_SCHEMA], "totalResults": len(resources), "startIndex": start,
            "itemsPerPage": len(page), "Resources": page}


def query(resources: list[dict[str, Any]], params: Mapping[str, str]) -> dict[str, Any]:
    """A whole list request: ``filter``, ``sortBy``, ``sortOrder``, ``startIndex``,
    ``count``, ``attributes``, ``excludedAttributes`` (RFC 7644 §3.4.2; parameter names
    case-insensitive) applied to ``resources``; returns :func:`list_response`'s dict."""
    p = {k.lower(): v for k, v in params.items() if isinstance(k, str)}
    if p.get("filter"):
        flt = parse_filter(p["filter"])
        resources = [r for r in resources if flt.matches(r)]
    resources = sort_resources(resources, p.get("sortby"), p.get("sortorder"))
    start, count = parse_paging(params)
    body = list_response(resources, start, count)
    body["Resources"] = [project(r, p.get("attributes"), p.get("excludedattributes"))
                         for r in body["Resources"]]
    return body


# ---- attribute values (RFC 7643 §4.1, §4.3) --------------------------------------------

def _string(field: str, value: Any, *, nonempty: bool = False, limit: int = 255) -> str:
    if not isinstance(value, str):
        raise _err("invalidValue", f"{field} must be a string")
    if nonempty and not value.strip():
        raise _err("invalidValue", f"{field} must not be empty")
    if len(value) > limit:
        raise _err("invalidValue", f"{field} is longer than {limit} characters")
    return value


def _item(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err("invalidValue", f"{field} items must be objects with a string 'value'")
    out: dict[str, Any] = {}
    for key, v in value.items():
        sub = _ITEM_SUBS.get(key.lower()) if isinstance(key, str) else None
        if sub is not None and v is not None:
            out[sub] = _sub_value(f"{field}.{sub}", sub, v)
    if not out.get("value"):
        raise _err("invalidValue", f"{field} items must be objects with a string 'value'")
    return out


def _sub_value(field: str, sub: str, value: Any) -> Any:
    if sub == "primary":
        if not isinstance(value, bool):
            raise _err("invalidValue", f"{field} must be a boolean")
        return value
    return _string(field, value, limit=1024)


def _items(field: str, value: Any) -> list[dict[str, Any]]:
    """A list (or one object) of complex values, de-duplicated by ``value``."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _err("invalidValue", f"{field} must be a list of objects with a string 'value'")
    return _merge([], [_item(field, v) for v in value])


def _merge(existing: list[Any], new: list[dict[str, Any]]) -> list[Any]:
    seen = {e.get("value") for e in existing if isinstance(e, dict)}
    out = list(existing)
    for item in new:
        if item["value"] not in seen:
            seen.add(item["value"])
            out.append(item)
    return out


def _coerce(attr: str, value: Any) -> Any:
    """``value`` checked (and normalized) for the canonical attribute ``attr``."""
    if attr in _MULTI:
        return _items(attr, value)
    if attr == "active":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # Azure AD sends "True"/"False"
        if not isinstance(value, bool):
            raise _err("invalidValue", "active must be a boolean")
        return value
    if attr == "name":
        if not isinstance(value, dict):
            raise _err("invalidValue", "name must be an object")
        return {_NAME_SUBS[k.lower()]: _string(f"name.{k}", v) for k, v in value.items()
                if isinstance(k, str) and k.lower() in _NAME_SUBS and v is not None}
    if attr.startswith("name."):
        return _string(attr, value)
    if attr == "externalId":
        return None if value is None else _string(attr, value, limit=1024)
    if attr == "applicationId":
        if not isinstance(value, str) or not _UUID_RE.match(value):
            raise _err("invalidValue", "applicationId must be a UUID string")
        return value.lower()
    if attr == "schemas":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise _err("invalidValue", "schemas must be a list of strings")
        return list(value)
    if attr == "meta":
        if not isinstance(value, dict):
            raise _err("invalidValue", "meta must be an object")
        return copy.deepcopy(value)
    return _string(attr, value, nonempty=attr in ("userName", "id"))


# ---- §3.5.2 PATCH -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Path:
    attr: str  # canonical top-level attribute
    sub: str | None  # canonical sub-attribute
    filter: Filter | None  # value filter on a multi-valued attribute


def _parse_path(raw: str, allowed: frozenset[str]) -> _Path:
    m = _PATH_RE.match(raw.strip()) if len(raw) <= 1024 else None
    if m is None:
        raise _err("invalidPath", f"invalid path {raw[:128]!r}")
    attr = m["attr"]
    if attr[:4].lower() == "urn:":
        attr = attr.rsplit(":", 1)[1]
    parts = attr.split(".")
    top = _ATTRS.get(parts[0].lower())
    if top is None or top not in allowed or len(parts) > 2 or (len(parts) == 2 and m["sub"]):
        raise _err("invalidPath", f"unknown attribute in path {raw[:128]!r}")
    sub_raw = parts[1] if len(parts) == 2 else m["sub"]
    sub = None
    if sub_raw is not None:
        subs = _NAME_SUBS if top == "name" else _ITEM_SUBS if top in _MULTI else {}
        sub = subs.get(sub_raw.lower())
        if sub is None or (top in _MULTI and m["filter"] is None):
            raise _err("invalidPath", f"invalid sub-attribute in path {raw[:128]!r}")
    flt = None
    if m["filter"] is not None:
        if top not in _MULTI:
            raise _err("invalidPath", f"{top} is not multi-valued: {raw[:128]!r}")
        try:
            flt = parse_filter(m["filter"])
        except ScimError as exc:
            raise _err("invalidPath", f"invalid filter in path {raw[:128]!r}: "
                                      f"{exc.message}") from None
    return _Path(top, sub, flt)


def _list(resource: dict[str, Any], attr: str) -> list[Any]:
    value = resource.get(attr)
    return list(value) if isinstance(value, list) else []


def _set(res: dict[str, Any], p: _Path, value: Any, add: bool) -> None:
    if p.filter is not None:
        items = _list(res, p.attr)
        hits = [i for i, e in enumerate(items) if isinstance(e, dict) and p.filter.matches(e)]
        if not hits:
            f = p.filter
            if (p.sub and isinstance(f, Compare) and f.op == "eq" and len(f.path) == 1
                    and _ITEM_SUBS.get(f.path[0], p.sub) != p.sub):
                seed = {_ITEM_SUBS[f.path[0]]: f.value, p.sub: value}  # e.g. emails[type eq
                res[p.attr] = _merge(items, [_item(p.attr, seed)])  # "work"].value: create
                return
            raise _err("noTarget", f"no {p.attr} value matches the path's filter")
        new = (_sub_value(f"{p.attr}.{p.sub}", p.sub, value) if p.sub else _items(p.attr, value))
        if not p.sub and len(new) != 1:
            raise _err("invalidValue", f"a filtered {p.attr} path takes exactly one value")
        for i in hits:
            items[i] = {**items[i], p.sub: new} if p.sub else dict(new[0])
        res[p.attr] = _merge([], [e for e in items if isinstance(e, dict) and e.get("value")])
    elif p.sub is not None:
        name = res.get("name")
        res["name"] = {**(name if isinstance(name, dict) else {}),
                       p.sub: _coerce(f"name.{p.sub}", value)}
    elif p.attr in _MULTI:
        new_items = _coerce(p.attr, value)
        res[p.attr] = _merge(_list(res, p.attr), new_items) if add else new_items
    elif p.attr == "name":
        name = res.get("name")
        res["name"] = {**(name if isinstance(name, dict) else {}), **_coerce("name", value)}
    else:
        res[p.attr] = _coerce(p.attr, value)


def _remove(res: dict[str, Any], p: _Path, value: Any) -> None:
    if p.filter is not None:
        if p.sub == "value":
            raise _err("invalidPath", "remove the whole item instead of its 'value'")
        flt = p.filter
        items = _list(res, p.attr)
        res[p.attr] = [
            e if not (isinstance(e, dict) and flt.matches(e))
            else {k: v for k, v in e.items() if k != p.sub} if p.sub else None
            for e in items]
        res[p.attr] = [e for e in res[p.attr] if e is not None]
    elif p.sub is not None:
        name = res.get("name")
        if isinstance(name, dict):
            res["name"] = {k: v for k, v in name.items() if k != p.sub}
    elif p.attr in _MULTI:
        drop = {i["value"] for i in _items(p.attr, value)} if value is not None else None
        res[p.attr] = [] if drop is None else [
            e for e in _list(res, p.attr) if not (isinstance(e, dict) and e.get("value") in drop)]
    else:
        res.pop(p.attr, None)


def _mutated(before: dict[str, Any], after: dict[str, Any], immutable: frozenset[str]) -> str:
    for name in sorted(immutable):
        top, _, sub = name.partition(".")
        a, b = before.get(top, _MISSING), after.get(top, _MISSING)
        if sub:
            a = a.get(sub, _MISSING) if isinstance(a, dict) else _MISSING
            b = b.get(sub, _MISSING) if isinstance(b, dict) else _MISSING
        if a != b:
            return name
    return ""


_MISSING = object()


def apply_patch(resource: dict[str, Any], body: dict[str, Any], *,
                immutable: frozenset[str] = _DEFAULT_IMMUTABLE,
                attributes: frozenset[str] | None = None) -> dict[str, Any]:
    """RFC 7644 §3.5.2 PatchOp: a new resource with ``body``'s operations applied in order::

        {"schemas": [PATCH_SCHEMA],  # optional
         "Operations": [{"op": "add" | "replace" | "remove", "path": "members", "value": ...}]}

    ``op`` and paths are case-insensitive (Azure AD sends ``"Add"``); result keys are
    canonical (``userName``). ``add`` appends to multi-valued attributes de-duplicated by
    ``value`` and sets others; ``replace`` replaces; both without ``path`` take an object of
    attributes; ``name`` is merged. ``remove`` takes ``attr[filter]``, a multi-valued
    attribute with a ``value`` list of items to drop (or none: drop all), or an attribute.
    ``attr[filter].sub`` paths update matching items. ``resource`` is never mutated.

    ``attributes`` limits paths to those canonical names (e.g. :data:`GROUP_ATTRIBUTES`;
    None: all known). Raises ScimError 400: ``invalidSyntax`` (body shape, unknown op),
    ``invalidPath``, ``invalidValue``, ``noTarget`` (remove without path; a filtered
    add/replace matching nothing), ``mutability`` (an ``immutable`` attribute would change).
    """
    try:
        return _apply_patch(resource, body, immutable, (
            frozenset(_ATTRS.values()) if attributes is None else attributes))
    except RecursionError:
        raise _err("invalidValue", "PATCH value nested too deeply") from None


def _apply_patch(resource: dict[str, Any], body: Any, immutable: frozenset[str],
                 allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _err("invalidSyntax", "PATCH body must be a JSON object")
    fields = {k.lower(): v for k, v in body.items() if isinstance(k, str)}
    schemas = fields.get("schemas")
    if schemas is not None and (not isinstance(schemas, list) or PATCH_SCHEMA not in schemas):
        raise _err("invalidSyntax", f"schemas must contain {PATCH_SCHEMA!r}")
    ops = fields.get("operations")
    if not isinstance(ops, list) or not ops:
        raise _err("invalidSyntax", "Operations must be a non-empty list of operations")
    out = copy.deepcopy(resource)
    tops = {name.partition(".")[0] for name in immutable}
    for n, raw_op in enumerate(ops):
        if not isinstance(raw_op, dict):
            raise _err("invalidSyntax", f"Operations[{n}] must be an object")
        op = {k.lower(): v for k, v in raw_op.items() if isinstance(k, str)}
        name = op.get("op")
        kind = name.lower() if isinstance(name, str) else None
        if kind not in ("add", "remove", "replace"):
            raise _err("invalidSyntax", f"Operations[{n}]: unsupported op {name!r} "
                                        "(expected add, remove or replace)")
        path = op.get("path")
        if path is not None and not isinstance(path, str):
            raise _err("invalidPath", f"Operations[{n}]: path must be a string")
        path = path if path and path.strip() else None
        before = {t: copy.deepcopy(out[t]) for t in tops if t in out}
        if kind == "remove":
            if path is None:
                raise _err("noTarget", f"Operations[{n}]: remove needs a path")
            _remove(out, _parse_path(path, allowed), op.get("value"))
        elif "value" not in op:
            raise _err("invalidValue", f"Operations[{n}]: {kind} needs a value")
        elif path is not None:
            _set(out, _parse_path(path, allowed), op["value"], kind == "add")
        elif not isinstance(op["value"], dict):
            raise _err("invalidValue", f"Operations[{n}]: {kind} without path needs an object")
        else:
            for key, v in op["value"].items():
                _set(out, _parse_path(str(key), allowed), v, kind == "add")
        changed = _mutated(before, out, immutable)
        if changed:
            raise _err("mutability", f"Operations[{n}]: {changed} is immutable")
    return out


# ---- §3.3 create / §3.5.1 replace bodies -----------------------------------------------

def check_resource(kind: str, body: dict[str, Any], *, for_create: bool) -> dict[str, Any]:
    """A normalized copy of a create (POST, ``for_create=True``) or PUT body for ``kind`` in
    ``{"Users", "ServicePrincipals", "Groups"}``: known attributes only (case-insensitive;
    ``id``, ``meta``, unknown keys, URN extension blocks and nulls dropped), ``schemas``
    the canonical list, multi-valued attributes as ``[{"value": str, ...}]`` de-duplicated.

    On create, Users need a non-empty ``userName`` (≤ 255 chars), ServicePrincipals a string
    ``displayName``, Groups a non-empty ``displayName``. ``applicationId`` must be a UUID
    (returned lower-case); ``active`` a boolean. Raises ScimError 400 ``invalidSyntax`` (not
    an object) or ``invalidValue`` (naming the field); ValueError for an unknown ``kind``.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown SCIM resource kind {kind!r}")
    allowed, schemas = _KINDS[kind]
    if not isinstance(body, dict):
        raise _err("invalidSyntax", "request body must be a JSON object")
    out: dict[str, Any] = {"schemas": list(schemas)}
    try:
        for key, value in body.items():
            attr = _ATTRS.get(key.lower()) if isinstance(key, str) else None
            if attr in allowed and attr not in ("id", "meta", "schemas") and value is not None:
                out[attr] = _coerce(attr, value)
    except RecursionError:
        raise _err("invalidValue", "request body nested too deeply") from None
    required = {"Users": "userName", "ServicePrincipals": "displayName",
                "Groups": "displayName"}[kind]
    if for_create and required not in out:
        raise _err("invalidValue", f"{required} is required")
    if kind == "Groups" and "displayName" in out and not out["displayName"].strip():
        raise _err("invalidValue", "displayName must not be empty")
    return out
