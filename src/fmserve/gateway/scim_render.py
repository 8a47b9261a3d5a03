"""SCIM resources rendered from the in-memory directory (governance spec §4.3), and the
membership arithmetic the SCIM service checks writes with.

Shapes (JSON keys exactly as databricks-sdk ``iam.py`` ``from_dict`` reads them)::

    User             {id, userName, displayName, active, emails, name, entitlements,
                      groups: [{value, display, $ref, type: "direct"}], roles, externalId,
                      schemas}
    ServicePrincipal {id, applicationId, displayName, active, entitlements, groups, roles,
                      externalId, schemas}
    Group            {id, displayName, members: [{value, display, $ref}], groups,
                      entitlements, roles, externalId, meta: {resourceType:
                      "WorkspaceGroup"}, schemas}

``groups`` lists the groups a principal is a *direct* member of (the built-in ``users``
included); ``$ref`` is relative (``Groups/<id>``, ``Users/<id>``, ...). Pure reads of the
directory: no I/O, safe on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fmserve.gateway.directory import Directory
from fmserve.protocol.scim import GROUP_SCHEMAS, SP_SCHEMAS, USER_SCHEMAS
from fmserve.store.principals import ADMINS, GROUP, SERVICE_PRINCIPAL, USER, PrincipalRecord

# SCIM resource type (the path segment) ↔ store kind.
KINDS = {"Users": USER, "ServicePrincipals": SERVICE_PRINCIPAL, "Groups": GROUP}
RESOURCE_TYPES = {kind: rtype for rtype, kind in KINDS.items()}
# SCIM attributes kept in ``PrincipalRecord.attrs`` (the rest are columns or memberships).
ATTR_KEYS = {USER: ("emails", "name", "entitlements", "roles"),
             SERVICE_PRINCIPAL: ("entitlements", "roles"),
             GROUP: ("entitlements", "roles")}


def ref(rec: PrincipalRecord) -> str:
    """``Users/<id>``, ``ServicePrincipals/<id>`` or ``Groups/<id>``."""
    return f"{RESOURCE_TYPES[rec.kind]}/{rec.id}"


def display(rec: PrincipalRecord) -> str:
    """The name a member/group list shows: the display name, else the user name or
    application id."""
    return rec.display_name or rec.name


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def render(d: Directory, rec: PrincipalRecord) -> dict[str, Any]:
    """The SCIM resource of ``rec`` (see the module doc for the shapes)."""
    groups = [{"value": g.id, "display": display(g), "$ref": ref(g), "type": "direct"}
              for g in d.ids(d.direct_groups(rec.id)) if g.kind == GROUP]
    groups.sort(key=lambda g: g["display"].lower())
    out: dict[str, Any] = {"id": rec.id}
    if rec.kind == USER:
        out.update(userName=rec.name, displayName=rec.display_name, active=rec.active,
                   emails=_list(rec.attrs.get("emails")))
        if isinstance(rec.attrs.get("name"), dict) and rec.attrs["name"]:
            out["name"] = dict(rec.attrs["name"])
    elif rec.kind == SERVICE_PRINCIPAL:
        out.update(applicationId=rec.name, displayName=rec.display_name, active=rec.active)
    else:
        members = [{"value": m.id, "display": display(m), "$ref": ref(m)}
                   for m in d.ids(d.members(rec.id))]
        out.update(displayName=rec.name, members=members)
    out.update(entitlements=_list(rec.attrs.get("entitlements")), groups=groups,
               roles=_list(rec.attrs.get("roles")))
    if rec.external_id:
        out["externalId"] = rec.external_id
    if rec.kind == GROUP:
        out["meta"] = {"resourceType": "WorkspaceGroup"}
    out["schemas"] = list({USER: USER_SCHEMAS, SERVICE_PRINCIPAL: SP_SCHEMAS,
                           GROUP: GROUP_SCHEMAS}[rec.kind])
    return out


def render_me(d: Directory, rec: PrincipalRecord) -> dict[str, Any]:
    """``GET /Me``: the caller's User resource; for a service principal (which
    ``w.current_user.me()`` also parses as a ``User``) its resource with ``userName`` =
    its ``applicationId``, as the rest of the platform names it."""
    res = render(d, rec)
    if rec.kind == SERVICE_PRINCIPAL:
        res = {"id": res["id"], "userName": rec.name, **{k: v for k, v in res.items()
                                                          if k != "id"}}
    return res


def ancestors(d: Directory, principal_id: str) -> set[str]:
    """Every group ``principal_id`` belongs to, directly or through nested groups."""
    seen: set[str] = set()
    todo = list(d.direct_groups(principal_id))
    while todo:
        g = todo.pop()
        if g not in seen:
            seen.add(g)
            todo.extend(d.direct_groups(g))
    return seen


def descendants(d: Directory, group_id: str) -> set[str]:
    """Every member of ``group_id``, directly or through nested groups."""
    seen: set[str] = set()
    todo = list(d.members(group_id))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(d.members(m))
    return seen


def admin_users(d: Directory, *, members: Mapping[str, Iterable[str]] | None = None,
                parents: Mapping[str, Iterable[str]] | None = None,
                gone: Iterable[str] = ()) -> set[str]:
    """The active users in ``admins`` (directly or through nested groups) once a change
    is made: ``members`` gives groups' new member ids, ``parents`` principals' new direct
    groups, ``gone`` principals deleted or deactivated."""
    new_members = {g: set(ms) for g, ms in (members or {}).items()}
    new_parents = {m: set(gs) for m, gs in (parents or {}).items()}
    removed = set(gone)

    def members_of(g: str) -> set[str]:
        out = set(new_members[g]) if g in new_members else set(d.members(g))
        for m, gs in new_parents.items():
            if g in gs:
                out.add(m)
            else:
                out.discard(m)
        return out

    admins = d.builtin_group(ADMINS)
    found: set[str] = set()
    seen: set[str] = set()
    todo = [admins] if admins else []
    while todo:
        for m in members_of(todo.pop()):
            if m in seen or m in removed:
                continue
            seen.add(m)
            rec = d.record(m)
            if rec is not None and rec.kind == GROUP:
                todo.append(m)
            elif rec is not None and rec.kind == USER and rec.active:
                found.add(m)
    return found
