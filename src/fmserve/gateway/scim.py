"""The workspace SCIM service (governance spec §4.3): SCIM resources ↔ the principal store
and the in-memory directory.

Reads (get, list, Me) render from :class:`~fmserve.gateway.directory.Directory` on the
event loop; writes (create, PATCH, PUT, DELETE) are checked whole against the directory,
then stored in one :meth:`Identity.write <fmserve.gateway.identity.Identity.write>` (a
worker thread, then a directory reload, so the next request on this server sees them).
Writes on one server are serialized by a lock, so two requests cannot both pass the
checks (say, each removing one of the last two admins).

Rules:

* only workspace admins write (403); any authenticated principal reads;
* ``userName`` (users) and ``applicationId`` (service principals) never change
  (400 ``mutability``); a service principal created without ``applicationId`` gets a new
  UUID, a given one must be a UUID no other service principal has;
* names are unique per kind, case-insensitively (409 ``uniqueness``);
* membership can be written from either side: a group's ``members`` or a principal's
  ``groups``; member and group ids must exist (400 ``invalidValue``); a group cannot
  contain itself, directly or through nested groups (400);
* built-in groups: ``users`` holds every user and service principal automatically
  (a write that leaves one out keeps it; changing ``users``' members is a 400);
  ``admins`` can be changed, but never so that no active user is an admin (400); neither
  can be renamed or deleted (400);
* PUT replaces every attribute (omitted optional ones are cleared), except memberships:
  ``members`` / ``groups`` are replaced only when the body carries them.

Every failure is a :class:`~fmserve.errors.ScimError` and nothing is stored.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fmserve.errors import FmserveError, ScimError
from fmserve.gateway.directory import Directory, Principal
from fmserve.gateway.identity import Identity
from fmserve.gateway.scim_render import (
    ATTR_KEYS,
    KINDS,
    admin_users,
    ancestors,
    descendants,
    render,
    render_me,
)
from fmserve.protocol import scim
from fmserve.store.principals import ADMINS, GROUP, SERVICE_PRINCIPAL, USER, USERS, PrincipalRecord

T = TypeVar("T")

_LABELS = {USER: "User", SERVICE_PRINCIPAL: "Service principal", GROUP: "Group"}
_NAME_ATTR = {USER: "userName", SERVICE_PRINCIPAL: "applicationId", GROUP: "displayName"}
_ALLOWED = {USER: scim.USER_ATTRIBUTES, SERVICE_PRINCIPAL: scim.SP_ATTRIBUTES,
            GROUP: scim.GROUP_ATTRIBUTES}
_MAX_EXTERNAL_ID = 255  # the column's size


@dataclass(frozen=True)
class Change:
    """What one write stores for a principal (``None``: leave as is)."""

    name: str | None  # groups: the new displayName
    display_name: str
    active: bool
    external_id: str
    attrs: dict[str, Any]
    members: list[str] | None  # groups: every member id
    groups: list[str] | None  # every group the principal is directly in


def _bad(detail: str, scim_type: str = "invalidValue") -> ScimError:
    return ScimError(400, detail, scim_type)


def _values(items: Any) -> list[str]:
    """The ``value`` of each item of a multi-valued attribute, de-duplicated in order."""
    out = [i.get("value") for i in items if isinstance(i, dict)] if isinstance(items, list) \
        else []
    return list(dict.fromkeys(v for v in out if isinstance(v, str) and v))


def kind_of(resource_type: str) -> str:
    """``Users`` → ``user`` etc. Raises ScimError 404 for another resource type."""
    kind = KINDS.get(resource_type)
    if kind is None:
        raise ScimError(404, f"Unknown SCIM resource type '{resource_type}'.")
    return kind


class ScimService:
    """SCIM operations on one server's identity; ``resource_type`` is ``Users``,
    ``ServicePrincipals`` or ``Groups``; bodies and resources are SCIM JSON dicts."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._lock = asyncio.Lock()

    @property
    def directory(self) -> Directory:
        return self.identity.directory

    # -- reads -------------------------------------------------------------------------
    def get(self, resource_type: str, rid: str, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /{resource_type}/{rid}``, projected by ``attributes`` /
        ``excludedAttributes``. Raises ScimError 404."""
        res = render(self.directory, self._record(kind_of(resource_type), rid))
        return _project(res, params)

    def search(self, resource_type: str, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /{resource_type}``: the ListResponse (filter, sortBy/sortOrder,
        startIndex/count, attributes/excludedAttributes; see :func:`scim.query`). Raises
        ScimError 400 (``invalidFilter``, ``invalidValue``)."""
        d = self.directory
        return scim.query([render(d, r) for r in d.records(kind_of(resource_type))], params)

    def me(self, who: Principal, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /Me``: the caller as a ``User`` (see :func:`render_me`)."""
        rec = self.directory.record(who.id)
        if rec is None:
            raise ScimError(404, f"Principal '{who.name}' does not exist.")
        return _project(render_me(self.directory, rec), params)

    # -- writes ------------------------------------------------------------------------
    async def create(self, resource_type: str, body: dict[str, Any],
                     who: Principal) -> dict[str, Any]:
        """``POST /{resource_type}``: the new resource. Raises ScimError 400, 403, 409."""
        kind = kind_of(resource_type)
        _require_admin(who, f"create {resource_type}")
        data = scim.check_resource(resource_type, body, for_create=True)
        async with self._lock:
            d = self.directory
            name = data.get(_NAME_ATTR[kind]) or str(uuid.uuid4())
            taken = d.find(kind, name)
            if taken is not None:
                raise ScimError(409, f"{_LABELS[kind]} with {_NAME_ATTR[kind]} '{name}' "
                                "already exists.", "uniqueness")
            if kind == USER:
                data.setdefault("displayName", _full_name(data) or name)
                if "@" in name:
                    data.setdefault("emails", [{"value": name, "type": "work",
                                                "primary": True}])
            change = self._plan(kind, None, {}, data)
            rec = await self._write(self._store_create, kind, name, change)
            return render(self.directory, self._record(kind, rec.id))

    async def patch(self, resource_type: str, rid: str, body: dict[str, Any],
                    who: Principal) -> dict[str, Any]:
        """``PATCH /{resource_type}/{rid}`` (RFC 7644 §3.5.2 PatchOp): the updated
        resource. Raises ScimError 400, 403, 404, 409."""
        kind = kind_of(resource_type)
        _require_admin(who, f"change {resource_type}")
        async with self._lock:
            rec = self._record(kind, rid)
            before = render(self.directory, rec)
            after = scim.apply_patch(before, body, immutable=self._immutable(rec),
                                     attributes=_ALLOWED[kind])
            return await self._update(rec, before, after)

    async def replace(self, resource_type: str, rid: str, body: dict[str, Any],
                      who: Principal) -> dict[str, Any]:
        """``PUT /{resource_type}/{rid}``: a full replace (memberships only when given).
        Raises ScimError 400, 403, 404, 409."""
        kind = kind_of(resource_type)
        _require_admin(who, f"change {resource_type}")
        data = scim.check_resource(resource_type, body, for_create=False)
        async with self._lock:
            rec = self._record(kind, rid)
            before = render(self.directory, rec)
            key = _NAME_ATTR[kind]
            if kind != GROUP and key in data and data[key].lower() != rec.name.lower():
                raise _bad(f"{key} cannot be changed.", "mutability")
            after = dict(data)
            for attr in ("displayName", "members", "groups") if kind == GROUP else ("groups",):
                if attr not in data and attr in before:
                    after[attr] = before[attr]
            return await self._update(rec, before, after)

    async def delete(self, resource_type: str, rid: str, who: Principal) -> None:
        """``DELETE /{resource_type}/{rid}``, with the principal's memberships, grants,
        tokens and secrets. Raises ScimError 400 (a built-in group; the last admin),
        403, 404."""
        kind = kind_of(resource_type)
        _require_admin(who, f"delete {resource_type}")
        async with self._lock:
            d = self.directory
            rec = self._record(kind, rid)
            if kind == GROUP and rec.name in (ADMINS, USERS):
                raise _bad(f"The built-in group '{rec.name}' cannot be deleted.")
            if admin_users(d) and not admin_users(d, gone={rid}):
                raise _bad(f"{_LABELS[kind]} '{rec.name}' holds the last workspace admin; "
                           "make another user an admin first.")
            await self._write(self.identity.principals.delete, rid, kind)

    # -- internals ---------------------------------------------------------------------
    def _record(self, kind: str, rid: str) -> PrincipalRecord:
        rec = self.directory.record(rid, kind)
        if rec is None:
            raise ScimError(404, f"{_LABELS[kind]} with id '{rid[:64]}' does not exist.")
        return rec

    def _immutable(self, rec: PrincipalRecord) -> frozenset[str]:
        fixed = {"id", "schemas", "meta"}
        if rec.kind != GROUP:
            fixed.add(_NAME_ATTR[rec.kind])
        elif rec.name in (ADMINS, USERS):
            fixed.add("displayName")
            if rec.name == USERS:
                fixed.add("members")
        return frozenset(fixed)

    async def _update(self, rec: PrincipalRecord, before: dict[str, Any],
                      after: dict[str, Any]) -> dict[str, Any]:
        change = self._plan(rec.kind, rec, before, after)
        await self._write(self._store_update, rec.id, rec.kind, change)
        return render(self.directory, self._record(rec.kind, rec.id))

    def _plan(self, kind: str, rec: PrincipalRecord | None, before: dict[str, Any],
              after: dict[str, Any]) -> Change:
        """The checked :class:`Change` that turns ``before`` into ``after`` (``rec`` None:
        a create). Raises ScimError 400 / 409."""
        d = self.directory
        pid = rec.id if rec is not None else ""
        name = None
        if kind == GROUP:
            name = after.get("displayName")
            if not isinstance(name, str) or not name.strip():
                raise _bad("displayName must not be empty.")
            if rec is not None and rec.name in (ADMINS, USERS) and name != rec.name:
                raise _bad(f"The built-in group '{rec.name}' cannot be renamed.", "mutability")
            taken = d.find(GROUP, name)
            if taken is not None and taken.id != pid:
                raise ScimError(409, f"Group with displayName '{name}' already exists.",
                                "uniqueness")
        external_id = after.get("externalId") or ""
        if len(external_id) > _MAX_EXTERNAL_ID:
            raise _bad(f"externalId is longer than {_MAX_EXTERNAL_ID} characters.")
        active = bool(after.get("active", True)) if kind != GROUP else True
        members = groups = None
        if kind == GROUP and set(_values(after.get("members"))) != set(
                _values(before.get("members"))):
            members = self._check_members(rec, _values(after.get("members")))
        if set(_values(after.get("groups"))) != set(_values(before.get("groups"))):
            groups = self._check_groups(kind, rec, before, _values(after.get("groups")))
        if rec is not None and (members is not None or groups is not None or not active):
            new_admins = admin_users(d, members={pid: members} if members is not None else {},
                                     parents={pid: groups} if groups is not None else {},
                                     gone={pid} if not active else ())
            if admin_users(d) and not new_admins:
                raise _bad("This change would leave the workspace without an active admin "
                           "user (a member of 'admins').")
        return Change(name=name, display_name=name or after.get("displayName") or "",
                      active=active, external_id=external_id,
                      attrs={k: after[k] for k in ATTR_KEYS[kind] if after.get(k)},
                      members=members, groups=groups)

    def _check_members(self, rec: PrincipalRecord | None, ids: list[str]) -> list[str]:
        d = self.directory
        if rec is not None and rec.name == USERS:
            raise _bad("The members of the built-in group 'users' are every user and "
                       "service principal; they cannot be changed.", "mutability")
        above = ancestors(d, rec.id) if rec is not None else set()
        for m in ids:
            member = d.record(m)
            if member is None:
                raise _bad(f"Member id '{m[:64]}' does not exist.")
            if rec is not None and (m == rec.id or m in above):
                raise _bad(f"Group '{member.name}' cannot be a member of '{rec.name}': "
                           "groups cannot contain themselves.")
        return ids

    def _check_groups(self, kind: str, rec: PrincipalRecord | None, before: dict[str, Any],
                      ids: list[str]) -> list[str]:
        d = self.directory
        users = d.builtin_group(USERS)
        below = descendants(d, rec.id) if rec is not None and kind == GROUP else set()
        for g in ids:
            grp = d.record(g, GROUP)
            if grp is None:
                raise _bad(f"Group id '{g[:64]}' does not exist.")
            if rec is not None and (g == rec.id or g in below):
                raise _bad(f"'{rec.name}' cannot join group '{grp.name}': groups cannot "
                           "contain themselves.")
        if kind != GROUP:
            return list(dict.fromkeys([*ids, *([users] if users else [])]))
        if users and (users in ids) != (users in _values(before.get("groups"))):
            raise _bad("The members of the built-in group 'users' are every user and "
                       "service principal; they cannot be changed.", "mutability")
        return ids

    def _store_create(self, kind: str, name: str, change: Change) -> PrincipalRecord:
        store = self.identity.principals
        rec = store.create(kind, name, display_name=change.display_name, active=change.active,
                           external_id=change.external_id or None, attrs=change.attrs,
                           members=change.members)
        if change.groups is not None:
            try:
                store.set_groups(rec.id, change.groups)
            except Exception:
                store.delete(rec.id, kind)
                raise
        return rec

    def _store_update(self, rid: str, kind: str, change: Change) -> None:
        store = self.identity.principals
        store.update(rid, kind, display_name=change.display_name, active=change.active,
                     external_id=change.external_id, attrs=change.attrs, name=change.name,
                     members=change.members)
        if change.groups is not None:
            store.set_groups(rid, change.groups)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """A store write through ``identity.write``; store errors become ScimErrors."""
        try:
            return await self.identity.write(fn, *args)
        except ScimError:
            raise
        except FmserveError as exc:
            status = exc.status_code if exc.status_code in (400, 404, 409) else 400
            raise ScimError(status, exc.message, {400: "invalidValue", 409: "uniqueness"}.get(
                status)) from None


def _require_admin(who: Principal, action: str) -> None:
    if not who.is_admin:
        raise ScimError(403, f"Only workspace admins may {action}; principal '{who.name}' "
                        "is not in the 'admins' group.")


def _full_name(data: dict[str, Any]) -> str:
    name = data.get("name")
    if not isinstance(name, dict):
        return ""
    return " ".join(p for p in (name.get("givenName"), name.get("familyName")) if p).strip()


def _project(res: dict[str, Any], params: Mapping[str, str]) -> dict[str, Any]:
    p = {k.lower(): v for k, v in params.items() if isinstance(k, str)}
    return scim.project(res, p.get("attributes"), p.get("excludedattributes"))
