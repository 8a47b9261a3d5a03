"""Secrets REST API, as databricks-sdk ``WorkspaceClient().secrets`` calls it.

Under ``/api/2.0/secrets`` (the permission each needs in brackets):

- ``POST scopes/create`` ``{scope, initial_manage_principal?, scope_backend_type?}`` → ``{}``
  [any principal]; the creator gets ``MANAGE``, or — with
  ``initial_manage_principal: "users"``, the only value Databricks accepts — the group
  ``users`` does instead (so every principal manages the scope)
- ``POST scopes/delete`` ``{scope}`` → ``{}`` [MANAGE] (its secrets and ACLs go with it)
- ``GET scopes/list`` → ``{"scopes": [{"name", "backend_type": "DATABRICKS"}]}`` [any
  principal; every scope, as Databricks lists them]
- ``POST put`` ``{scope, key, string_value | bytes_value (base64)}`` → ``{}`` [WRITE]
  (creates or overwrites; the scope must exist)
- ``POST delete`` ``{scope, key}`` → ``{}`` [WRITE]
- ``GET list?scope=`` → ``{"secrets": [{"key", "last_updated_timestamp" (ms)}]}`` [READ]
- ``GET get`` → always 403 ``PERMISSION_DENIED``
- ``POST acls/put`` ``{scope, principal, permission}`` → ``{}`` [MANAGE] (creates or
  overwrites the principal's entry)
- ``GET acls/get?scope=&principal=`` → ``{"principal", "permission"}`` [MANAGE]
- ``GET acls/list?scope=`` → ``{"items": [{"principal", "permission"}]}`` [MANAGE]
- ``POST acls/delete`` ``{scope, principal}`` → ``{}`` [MANAGE]

ACLs: permissions are ``READ`` < ``WRITE`` < ``MANAGE``; ``principal`` is a user name, a
group name (``users`` is every principal) or a service principal's application id,
matched case-insensitively and stored as the principal is named. A caller has the
highest permission of the entries for itself and for its groups; workspace admins have
``MANAGE`` on every scope. A scope without entries (one made with ``fmserve secrets
create-scope``, or before ACLs existed) is for admins only. A config that references
``{{secrets/scope/key}}`` needs ``READ`` on the scope (``serving/manager.py``).

Every store call runs in a worker thread (the store is blocking database I/O); the
checks read the in-memory directory. No answer ever contains a secret value: values are
only resolved inside the server (``{{secrets/scope/key}}`` references in external-model
configs). Only the ``DATABRICKS`` backend exists.

Errors: 400 ``INVALID_PARAMETER_VALUE`` (missing/bad field, bad name, bad base64,
value over 128 KB, a permission outside ``READ|WRITE|MANAGE``, an
``initial_manage_principal`` other than ``users``), 403 ``PERMISSION_DENIED`` (naming
the permission needed and the scope), 404 ``RESOURCE_DOES_NOT_EXIST`` (scope, key,
principal or ACL entry; an unknown scope is a 404 for every caller), 409
``RESOURCE_ALREADY_EXISTS`` (scope).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.errors import InvalidParameterValue, PermissionDenied, ResourceDoesNotExist
from fmserve.gateway.auth import Principal
from fmserve.gateway.identity import Identity
from fmserve.gateway.policy import secret_permission
from fmserve.store.permissions import PermissionStore
from fmserve.store.principals import USERS
from fmserve.store.secrets import SecretStore

router = APIRouter(prefix="/api/2.0/secrets", dependencies=[Depends(principal)])
Who = Annotated[Principal, Depends(principal)]

BACKEND = "DATABRICKS"
READ, WRITE, MANAGE = "READ", "WRITE", "MANAGE"
PERMISSIONS = (READ, WRITE, MANAGE)
_RANK = {p: i for i, p in enumerate(PERMISSIONS)}
_DOES = {READ: "list its secrets", WRITE: "put or delete its secrets",
         MANAGE: "delete it or read and change its ACLs"}


def _store(request: Request) -> SecretStore:
    store: SecretStore = request.app.state.fm.secrets
    return store


def _identity(request: Request) -> Identity:
    identity: Identity = request.app.state.fm.identity
    return identity


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParameterValue(f"'{name}' is required and must be a non-empty string.")
    return value


def _query(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise InvalidParameterValue(f"Query parameter '{name}' is required.")
    return value


def _missing(scope: str) -> ResourceDoesNotExist:
    return ResourceDoesNotExist(f"Scope {scope} does not exist!")


async def _exists(request: Request, scope: str) -> bool:
    return scope in await asyncio.to_thread(_store(request).list_scopes)


async def _require(request: Request, who: Principal, scope: str, needed: str, *,
                   check_exists: bool = False) -> None:
    """Raises ResourceDoesNotExist (404) for an unknown scope — before any 403, for every
    caller when ``check_exists`` (otherwise the store call that follows answers it) — and
    PermissionDenied (403) when the caller's permission on the scope is below ``needed``."""
    have = secret_permission(_identity(request).directory, who, scope)
    if have is not None and _RANK[have] >= _RANK[needed]:
        if check_exists and not await _exists(request, scope):
            raise _missing(scope)
        return
    if not await _exists(request, scope):
        raise _missing(scope)
    raise PermissionDenied(
        f"Principal '{who.name}' does not have {needed} permission on secret scope "
        f"'{scope}'" + (f" (it has {have})" if have else "") + f"; it is needed to "
        f"{_DOES[needed]}. Ask a principal with MANAGE on the scope (or a workspace admin) "
        f"to grant it: databricks secrets put-acl {scope} {who.name} {needed}.")


def _acl_principal(request: Request, name: str) -> str:
    """The ACL name of a user, group or service principal (as it is spelled).

    Raises:
        ResourceDoesNotExist: 404 when no principal has that name.
    """
    rec = _identity(request).directory.resolve_name(name)
    if rec is None:
        raise ResourceDoesNotExist(
            f"Principal '{name}' does not exist: give a user name, a group name or a "
            "service principal's application id.")
    return rec.name


@router.post("/scopes/create")
async def create_scope(request: Request, who: Who) -> Response:
    body = await read_json(request)
    scope = _field(body, "scope")
    backend = body.get("scope_backend_type")
    if backend not in (None, BACKEND):
        raise InvalidParameterValue(
            f"scope_backend_type {backend!r} is not supported by fmserve; only "
            f"'{BACKEND}' scopes (stored encrypted in fmserve's database) exist.")
    initial = body.get("initial_manage_principal")
    if initial is not None and not isinstance(initial, str):
        raise InvalidParameterValue("'initial_manage_principal' must be a string.")
    if initial not in (None, USERS):
        raise InvalidParameterValue(
            f"initial_manage_principal {initial!r} is not supported: the only supported "
            f"principal is the group '{USERS}'; without it the creator gets MANAGE.")
    owner = USERS if initial else who.name
    identity = _identity(request)
    await identity.write(_create_scope, _store(request), identity.permissions, scope, owner)
    return json_response({})


def _create_scope(store: SecretStore, perms: PermissionStore, scope: str, owner: str) -> None:
    """Blocking: the scope, then its one ACL entry (entries a scope of that name left
    behind are dropped first)."""
    store.create_scope(scope)
    perms.drop_scope(scope)
    perms.put_acl(scope, owner, MANAGE)


@router.post("/scopes/delete")
async def delete_scope(request: Request, who: Who) -> Response:
    scope = _field(await read_json(request), "scope")
    await _require(request, who, scope, MANAGE)
    await _identity(request).write(_store(request).delete_scope, scope)  # ACLs go with it
    return json_response({})


@router.get("/scopes/list")
async def list_scopes(request: Request) -> Response:
    scopes = await asyncio.to_thread(_store(request).list_scopes)
    return json_response({"scopes": [{"name": s, "backend_type": BACKEND} for s in scopes]})


@router.post("/put")
async def put_secret(request: Request, who: Who) -> Response:
    body = await read_json(request)
    scope, key = _field(body, "scope"), _field(body, "key")
    text, raw = body.get("string_value"), body.get("bytes_value")
    if (text is None) == (raw is None):
        raise InvalidParameterValue("Exactly one of 'string_value' and 'bytes_value' "
                                    "must be set.")
    value: str | bytes
    if text is not None:
        if not isinstance(text, str):
            raise InvalidParameterValue("'string_value' must be a string.")
        value = text
    else:
        if not isinstance(raw, str):
            raise InvalidParameterValue("'bytes_value' must be a base64-encoded string.")
        try:
            value = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterValue("'bytes_value' is not valid base64.") from None
    await _require(request, who, scope, WRITE)
    await asyncio.to_thread(_store(request).put, scope, key, value)
    return json_response({})


@router.post("/delete")
async def delete_secret(request: Request, who: Who) -> Response:
    body = await read_json(request)
    scope, key = _field(body, "scope"), _field(body, "key")
    await _require(request, who, scope, WRITE)
    await asyncio.to_thread(_store(request).delete, scope, key)
    return json_response({})


@router.get("/list")
async def list_secrets(request: Request, who: Who) -> Response:
    scope = _query(request, "scope")
    await _require(request, who, scope, READ)
    items = await asyncio.to_thread(_store(request).list, scope)
    return json_response({"secrets": [
        {"key": m.key, "last_updated_timestamp": m.last_updated_timestamp} for m in items]})


@router.get("/get")
async def get_secret(request: Request) -> Response:
    raise PermissionDenied(
        "fmserve never returns secret values through the API. Secrets are only usable "
        "inside the server, as {{secrets/<scope>/<key>}} references in external-model "
        "configs; list keys with GET /api/2.0/secrets/list.")


# -- ACLs ----------------------------------------------------------------------------


@router.post("/acls/put")
async def put_acl(request: Request, who: Who) -> Response:
    body = await read_json(request)
    scope, name = _field(body, "scope"), _field(body, "principal")
    permission = body.get("permission")
    if permission not in PERMISSIONS:
        raise InvalidParameterValue(f"'permission' must be one of {', '.join(PERMISSIONS)}; "
                                    f"got {permission!r}.")
    await _require(request, who, scope, MANAGE, check_exists=True)
    identity = _identity(request)
    await identity.write(identity.permissions.put_acl, scope, _acl_principal(request, name),
                         permission)
    return json_response({})


def _entry(acl: dict[str, str], name: str, canonical: str | None) -> str | None:
    """The entry's principal as stored: ``name`` as given, else as the principal is
    spelled."""
    if name in acl:
        return name
    return canonical if canonical in acl else None


@router.get("/acls/get")
async def get_acl(request: Request, who: Who) -> Response:
    scope, name = _query(request, "scope"), _query(request, "principal")
    await _require(request, who, scope, MANAGE, check_exists=True)
    identity = _identity(request)
    acl = dict(await identity.read(identity.permissions.acls, scope))
    rec = identity.directory.resolve_name(name)
    hit = _entry(acl, name, rec.name if rec else None)
    if hit is None:
        raise ResourceDoesNotExist(f"No ACL for principal '{name}' in scope {scope}.")
    return json_response({"principal": hit, "permission": acl[hit]})


@router.get("/acls/list")
async def list_acls(request: Request, who: Who) -> Response:
    scope = _query(request, "scope")
    await _require(request, who, scope, MANAGE, check_exists=True)
    identity = _identity(request)
    acl = await identity.read(identity.permissions.acls, scope)
    return json_response({"items": [{"principal": p, "permission": perm} for p, perm in acl]})


@router.post("/acls/delete")
async def delete_acl(request: Request, who: Who) -> Response:
    body = await read_json(request)
    scope, name = _field(body, "scope"), _field(body, "principal")
    await _require(request, who, scope, MANAGE, check_exists=True)
    identity = _identity(request)
    acl = dict(await identity.read(identity.permissions.acls, scope))
    rec = identity.directory.resolve_name(name)
    hit = _entry(acl, name, rec.name if rec else None)
    if hit is None or not await identity.write(identity.permissions.delete_acl, scope, hit):
        raise ResourceDoesNotExist(f"No ACL for principal '{name}' in scope {scope}.")
    return json_response({})
