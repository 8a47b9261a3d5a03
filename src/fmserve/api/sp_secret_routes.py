"""Service-principal OAuth secrets on the workspace host (governance §4.4; databricks-sdk
``w.service_principal_secrets_proxy``, ``ServicePrincipalSecretsProxyAPI``).

Under ``/api/2.0/accounts/servicePrincipals/{service_principal_id}/credentials/secrets``::

    POST                {"lifetime": "<seconds>s"?, "scopes": [...]?}
                        → CreateServicePrincipalSecretResponse {id, secret, secret_hash,
                          status, create_time, update_time, expire_time, scopes?}
    GET   ?page_size&page_token
                        → {"secrets": [SecretInfo], "next_page_token"?}
    DELETE /{secret_id} → {}

``service_principal_id`` is the service principal's numeric SCIM ``id`` (the SDK's
"The service principal ID", an ``int`` before v0.59); its ``applicationId`` (a UUID,
never mistaken for an id) is accepted too. ``secret`` — the OAuth ``client_secret``,
``dose`` + 64 hex characters — is returned by ``POST`` only and stored as a SHA-256;
``secret_hash`` is the first characters of that hash, a handle to tell secrets apart.
Times are RFC 3339 UTC strings (``2026-05-01T12:00:00Z``), as the SDK types them
(``str``, "UTC time when…"); ``status`` is ``ACTIVE`` or ``EXPIRED``. ``lifetime``
defaults to 730 days (63072000s), the most allowed; ``scopes``, when given, bind the
tokens the secret can mint (they must include ``all-apis``; see ``oidc_routes``).

Workspace admins only: others get 403 ``PERMISSION_DENIED``. An unknown service
principal or secret is 404 ``RESOURCE_DOES_NOT_EXIST``; a bad ``lifetime``, ``scopes``,
``page_size`` or ``page_token`` is 400 ``INVALID_PARAMETER_VALUE``. Changes go through
``Identity.write``: a deleted secret mints nothing more, and the access tokens minted
from it stop on this server's next request (other replicas: within the 2 s sync).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.api.oidc_routes import API_SCOPE, SCOPES
from fmserve.errors import InvalidParameterValue, ResourceDoesNotExist
from fmserve.gateway.auth import Principal
from fmserve.gateway.identity import Identity, require_admin
from fmserve.store.credentials import DEFAULT_SECRET_LIFETIME_S, SecretInfo
from fmserve.store.principals import SERVICE_PRINCIPAL, PrincipalRecord

PREFIX = "/api/2.0/accounts/servicePrincipals/{service_principal_id}/credentials/secrets"
MAX_LIFETIME_S = DEFAULT_SECRET_LIFETIME_S
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000

router = APIRouter(dependencies=[Depends(principal)])
Who = Annotated[Principal, Depends(principal)]
_LIFETIME = re.compile(r"[0-9]{1,12}s")


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as an RFC 3339 UTC timestamp, to the second."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def secret_info(info: SecretInfo) -> dict[str, Any]:
    """A ``SecretInfo`` (governance §4.4) without the secret value."""
    out: dict[str, Any] = {"id": info.id, "secret_hash": info.secret_hash,
                           "status": info.status, "create_time": rfc3339(info.create_time),
                           "update_time": rfc3339(info.update_time),
                           "expire_time": rfc3339(info.expire_time)}
    if info.scopes:
        out["scopes"] = list(info.scopes)
    return out


def _sp(request: Request, who: Principal, ref: str, action: str) -> PrincipalRecord:
    """The service principal named by id or applicationId, for an admin caller.

    Raises: PermissionDenied (403); ResourceDoesNotExist (404).
    """
    require_admin(who, action)
    directory = request.app.state.fm.identity.directory
    rec = directory.record(ref, SERVICE_PRINCIPAL) or directory.find(SERVICE_PRINCIPAL, ref)
    if rec is None:
        raise ResourceDoesNotExist(f"Service principal '{ref[:100]}' does not exist.")
    return rec


def _lifetime(value: object) -> int:
    if value is None:
        return DEFAULT_SECRET_LIFETIME_S
    if not isinstance(value, str) or not _LIFETIME.fullmatch(value):
        raise InvalidParameterValue(f"'lifetime' must be a number of seconds followed by 's' "
                                    f"(e.g. \"3600s\"), got {str(value)[:40]!r}.")
    seconds = int(value[:-1])
    if not 0 < seconds <= MAX_LIFETIME_S:
        raise InvalidParameterValue(f"'lifetime' must be between 1s and {MAX_LIFETIME_S}s "
                                    "(730 days).")
    return seconds


def _scopes(value: object) -> list[str] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidParameterValue("'scopes' must be a list of strings.")
    unknown = [s for s in value if s not in SCOPES]
    if unknown:
        raise InvalidParameterValue(f"Unsupported scope {unknown[0][:64]!r}; fmserve "
                                    f"supports {', '.join(SCOPES)}.")
    if API_SCOPE not in value:
        raise InvalidParameterValue(f"'scopes' must include '{API_SCOPE}' (or be empty: "
                                    "unrestricted); without it the secret could mint nothing.")
    return list(dict.fromkeys(value))


@router.post(PREFIX)
async def create_secret(request: Request, service_principal_id: str, who: Who) -> Response:
    """A new client secret, shown once (``CreateServicePrincipalSecretResponse``)."""
    rec = _sp(request, who, service_principal_id, "manage service principal secrets")
    empty = request.headers.get("content-length") == "0" or (
        "content-length" not in request.headers and "transfer-encoding" not in request.headers)
    body = {} if empty else await read_json(request)
    lifetime, scopes = _lifetime(body.get("lifetime")), _scopes(body.get("scopes"))
    identity: Identity = request.app.state.fm.identity
    value, info = await identity.write(identity.credentials.create_secret, rec.id,
                                       lifetime, scopes)
    return json_response({**secret_info(info), "secret": value})


def _page(request: Request) -> tuple[int, int]:
    """``(offset, page size)`` from ``page_token`` and ``page_size``."""
    q = request.query_params
    size_s, token = q.get("page_size"), q.get("page_token")
    size = DEFAULT_PAGE_SIZE
    if size_s is not None:
        if not size_s.isdigit():
            raise InvalidParameterValue("'page_size' must be a non-negative integer.")
        size = min(int(size_s), MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE
    offset = 0
    if token:
        try:
            decoded = base64.urlsafe_b64decode(token.encode("ascii") + b"==").decode("ascii")
        except (binascii.Error, UnicodeError, ValueError):
            decoded = ""
        if not decoded.startswith("o:") or not decoded[2:].isdigit():
            raise InvalidParameterValue("'page_token' is not a token this server issued.")
        offset = int(decoded[2:])
    return offset, size


@router.get(PREFIX)
async def list_secrets(request: Request, service_principal_id: str, who: Who) -> Response:
    """``{"secrets": [SecretInfo], "next_page_token"?}``, oldest first."""
    rec = _sp(request, who, service_principal_id, "manage service principal secrets")
    offset, size = _page(request)
    identity: Identity = request.app.state.fm.identity
    infos = await identity.read(identity.credentials.secrets, rec.id)
    page = infos[offset:offset + size]
    out: dict[str, Any] = {"secrets": [secret_info(i) for i in page]}
    if offset + size < len(infos):
        out["next_page_token"] = base64.urlsafe_b64encode(
            f"o:{offset + size}".encode()).decode("ascii").rstrip("=")
    return json_response(out)


@router.delete(PREFIX + "/{secret_id}")
async def delete_secret(request: Request, service_principal_id: str, secret_id: str,
                        who: Who) -> Response:
    """Deletes one secret: ``{}``; its access tokens stop (see the module doc)."""
    rec = _sp(request, who, service_principal_id, "manage service principal secrets")
    identity: Identity = request.app.state.fm.identity
    if not await identity.write(identity.credentials.delete_secret, rec.id, secret_id):
        raise ResourceDoesNotExist(f"Service principal '{rec.name}' has no secret "
                                   f"'{secret_id[:64]}'.")
    return json_response({})
