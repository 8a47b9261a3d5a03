"""Personal access tokens and token management (governance §4.5; databricks-sdk
``TokensAPI`` and ``TokenManagementAPI``, ``service/settings.py``).

- ``POST /api/2.0/token/create`` ``{comment?, lifetime_seconds?}`` →
  ``{"token_value", "token_info": PublicTokenInfo}``: a token of the caller (a user, or a
  service principal — by PAT or OAuth token). No lifetime: two years, as the SDK's
  docstring says of Databricks. The value is returned here only.
- ``GET /api/2.0/token/list`` → ``{"token_infos": [PublicTokenInfo]}``: the caller's own.
- ``POST /api/2.0/token/delete`` ``{token_id}`` → ``{}``: one of the caller's (else 404).
- Workspace admins only: ``GET /api/2.0/token-management/tokens[?created_by_id=&
  created_by_username=]`` → ``{"token_infos": [TokenInfo]}``, ``GET|DELETE
  /api/2.0/token-management/tokens/{token_id}``, ``POST /api/2.0/token-management/
  on-behalf-of/tokens`` ``{application_id, lifetime_seconds?, comment?}`` →
  ``{"token_info": TokenInfo, "token_value"}`` (a PAT of that service principal).

``PublicTokenInfo`` = ``{token_id, comment, creation_time, expiry_time}`` (epoch ms,
``expiry_time`` -1 = never); ``TokenInfo`` adds ``owner_id``, ``created_by_id``,
``created_by_username`` and ``workspace_id`` (integers, as the SDK parses them). A deleted
token stops authenticating at once on this server (within 5 s on other replicas).
``scopes`` other than ``all-apis`` and ``autoscope_enabled: true`` are 400: fmserve does
not restrict a token to some APIs.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.errors import InvalidParameterValue, ResourceDoesNotExist
from fmserve.gateway.directory import Principal
from fmserve.gateway.identity import Identity, require_admin
from fmserve.store.principals import SERVICE_PRINCIPAL
from fmserve.store.tokens import TokenInfo

router = APIRouter(dependencies=[Depends(principal)])
Who = Annotated[Principal, Depends(principal)]

DEFAULT_LIFETIME_S = 2 * 365 * 86400  # "this token remains valid for 2 years"
MAX_LIFETIME_S = 100 * 365 * 86400
MAX_COMMENT = 1024


def _identity(request: Request) -> Identity:
    ident: Identity = request.app.state.fm.identity
    return ident


def _public(t: TokenInfo) -> dict[str, Any]:
    return {"token_id": t.token_id, "comment": t.comment, "creation_time": t.creation_time,
            "expiry_time": t.expiry_time}


def _full(ident: Identity, t: TokenInfo, workspace_id: str) -> dict[str, Any]:
    creator = ident.directory.record(t.created_by_id or "")
    out: dict[str, Any] = {**_public(t), "workspace_id": int(workspace_id)}
    if t.owner_id and t.owner_id.isdigit():
        out["owner_id"] = int(t.owner_id)
    if t.created_by_id and t.created_by_id.isdigit():
        out["created_by_id"] = int(t.created_by_id)
    if creator is not None:
        out["created_by_username"] = creator.name
    return out


def _params(body: dict[str, Any]) -> tuple[str, int]:
    """``(comment, lifetime_s)`` of a create body.

    Raises:
        InvalidParameterValue: 400 for a wrong type, a comment over 1024 characters, a
            lifetime ≤ 0 or over 100 years, scopes fmserve cannot honour.
    """
    comment = body.get("comment", "")
    if comment is None:
        comment = ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise InvalidParameterValue(f"'comment' must be a string of at most {MAX_COMMENT} "
                                    "characters.")
    lifetime = body.get("lifetime_seconds")
    if lifetime is None:
        lifetime = DEFAULT_LIFETIME_S
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or \
            not 0 < lifetime <= MAX_LIFETIME_S:
        raise InvalidParameterValue("'lifetime_seconds' must be a positive integer (seconds) "
                                    "of at most 100 years; omit it for two years.")
    scopes = body.get("scopes")
    if scopes is not None and (not isinstance(scopes, list) or
                               any(s != "all-apis" for s in scopes)):
        raise InvalidParameterValue("'scopes': fmserve tokens are valid for all APIs; omit "
                                    "scopes or send [\"all-apis\"].")
    if body.get("autoscope_enabled") not in (None, False):
        raise InvalidParameterValue("'autoscope_enabled' is not supported by fmserve.")
    return comment, lifetime


def _token_id(body: dict[str, Any]) -> str:
    tid = body.get("token_id")
    if not isinstance(tid, str) or not tid:
        raise InvalidParameterValue("'token_id' is required and must be a string.")
    return tid


@router.post("/api/2.0/token/create")
async def create(request: Request, who: Who) -> Response:
    comment, lifetime = _params(await read_json(request))
    ident = _identity(request)
    value, info = await ident.read(ident.tokens.create, owner_id=who.id, comment=comment,
                                   lifetime_s=lifetime)
    return json_response({"token_value": value, "token_info": _public(info)})


@router.get("/api/2.0/token/list")
async def list_own(request: Request, who: Who) -> Response:
    ident = _identity(request)
    tokens = await ident.read(ident.tokens.list, owner_id=who.id)
    return json_response({"token_infos": [_public(t) for t in tokens]})


@router.post("/api/2.0/token/delete")
async def delete_own(request: Request, who: Who) -> Response:
    tid = _token_id(await read_json(request))
    ident = _identity(request)
    info = await ident.read(ident.tokens.get, tid)
    if info is None or info.owner_id != who.id:
        raise ResourceDoesNotExist(f"Token with id '{tid}' does not exist.")
    await _revoke(ident, tid)
    return json_response({})


async def _revoke(ident: Identity, token_id: str) -> None:
    await ident.read(ident.tokens.revoke, token_id)
    ident.auth.forget(token_id)


# -- token management (admins) -------------------------------------------------------
@router.get("/api/2.0/token-management/tokens")
async def list_all(request: Request, who: Who) -> Response:
    require_admin(who, "list every token")
    ident = _identity(request)
    q = request.query_params
    created_by = q.get("created_by_id")
    if created_by is None and q.get("created_by_username"):
        rec = ident.directory.resolve_name(q["created_by_username"])
        created_by = rec.id if rec else "-"
    tokens = await ident.read(ident.tokens.list, created_by_id=created_by)
    ws = request.app.state.fm.workspace_id
    return json_response({"token_infos": [_full(ident, t, ws) for t in tokens]})


@router.get("/api/2.0/token-management/tokens/{token_id}")
async def get_one(request: Request, token_id: str,
                  who: Who) -> Response:
    require_admin(who, "read other principals' tokens")
    ident = _identity(request)
    info = await ident.read(ident.tokens.get, token_id)
    if info is None:
        raise ResourceDoesNotExist(f"Token with id '{token_id}' does not exist.")
    return json_response({"token_info": _full(ident, info, request.app.state.fm.workspace_id)})


@router.delete("/api/2.0/token-management/tokens/{token_id}")
async def delete_any(request: Request, token_id: str,
                     who: Who) -> Response:
    require_admin(who, "delete other principals' tokens")
    ident = _identity(request)
    if await ident.read(ident.tokens.get, token_id) is None:
        raise ResourceDoesNotExist(f"Token with id '{token_id}' does not exist.")
    await _revoke(ident, token_id)
    return json_response({})


@router.post("/api/2.0/token-management/on-behalf-of/tokens")
async def create_obo(request: Request, who: Who) -> Response:
    require_admin(who, "create tokens on behalf of service principals")
    body = await read_json(request)
    app_id = body.get("application_id")
    if not isinstance(app_id, str) or not app_id:
        raise InvalidParameterValue("'application_id' (the service principal's application "
                                    "id) is required.")
    comment, lifetime = _params(body)
    ident = _identity(request)
    sp = ident.directory.find(SERVICE_PRINCIPAL, app_id)
    if sp is None:
        raise ResourceDoesNotExist(f"Service principal with application id '{app_id}' does "
                                   "not exist.")
    value, info = await ident.read(ident.tokens.create, owner_id=sp.id, comment=comment,
                                   lifetime_s=lifetime, created_by_id=who.id)
    return json_response({"token_value": value,
                          "token_info": _full(ident, info, request.app.state.fm.workspace_id)})
