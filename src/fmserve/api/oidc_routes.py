"""OIDC discovery, JWKS and the OAuth token endpoint (governance §4.1–4.2, main spec
§3.4–3.5). All three are public: a client calls them before it has an access token.

``GET /oidc/.well-known/oauth-authorization-server``
    RFC 8414 metadata; databricks-sdk reads ``authorization_endpoint`` and
    ``token_endpoint`` (``oauth.get_endpoints_from_url``). ``<base>`` is the URL the
    request came to, as in ``/.well-known/databricks-config``.
``GET /oidc/jwks.json``
    The public keys that verify the access tokens (RFC 7517 JWK Set).
``POST /oidc/v1/token``
    OAuth 2.0 client credentials (RFC 6749 §4.4), ``application/x-www-form-urlencoded``:
    ``grant_type=client_credentials[&scope=all-apis]``. The client (a service principal:
    ``client_id`` = its ``applicationId``) authenticates with HTTP Basic
    ``base64(client_id:client_secret)`` — what databricks-sdk's OAuth M2M sends — or with
    the form fields ``client_id`` and ``client_secret``, never both. Success (RFC 6749
    §5.1, ``Cache-Control: no-store``)::

        {"access_token": "<JWT>", "token_type": "Bearer", "expires_in": 3600,
         "scope": "all-apis"}

    ``expires_in`` is 3600 s, or less when the client secret expires sooner. Errors are
    :class:`~fmserve.errors.OAuthError` (RFC 6749 §5.2, always ``application/json``):
    401 ``invalid_client`` (no, unknown or wrong credentials; an expired or deleted
    secret; an inactive or deleted service principal — one message for all, so a caller
    cannot probe which), 400 ``invalid_request`` (malformed body, missing
    ``grant_type``, two authentication methods, a repeated parameter, credentials in the
    URL, ``authorization_details``/``assume_group`` which fmserve cannot honour),
    ``unsupported_grant_type`` and ``invalid_scope``.

Scopes: every token fmserve mints carries ``all-apis`` (the REST and serving APIs);
``offline_access``, ``openid``, ``email`` and ``profile`` are accepted next to it and
change nothing (no refresh or ID token is issued; databricks-sdk adds
``offline_access`` in its user flows). A request without ``all-apis`` or with any other
scope (``sql``, ``iam.groups:read``, ...) is ``invalid_scope``, as is one beyond the
scopes its client secret was created with (none = unrestricted).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response
from fmserve.errors import OAuthError
from fmserve.gateway.identity import Identity
from fmserve.gateway.oauth import ACCESS_TOKEN_LIFETIME_S
from fmserve.store.db import now_ms
from fmserve.store.principals import SERVICE_PRINCIPAL

router = APIRouter()

API_SCOPE = "all-apis"
NO_OP_SCOPES = ("offline_access", "openid", "email", "profile")
SCOPES = (API_SCOPE, *NO_OP_SCOPES)
GRANT = "client_credentials"
_MAX_BODY = 16 * 1024
_FORM = "application/x-www-form-urlencoded"
_UNSUPPORTED_PARAMS = ("authorization_details", "assume_group")
_BAD_CLIENT = ("Client authentication failed: unknown client_id, wrong client_secret, or "
               "an expired or deleted secret or service principal.")


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.get("/oidc/.well-known/oauth-authorization-server")
async def discovery(request: Request) -> Response:
    """RFC 8414 authorization-server metadata (governance §4.1); no credentials needed."""
    base = _base(request)
    return json_response({
        "issuer": f"{base}/oidc",
        "authorization_endpoint": f"{base}/oidc/v1/authorize",
        "token_endpoint": f"{base}/oidc/v1/token",
        "jwks_uri": f"{base}/oidc/jwks.json",
        "scopes_supported": list(SCOPES),
        "grant_types_supported": [GRANT],
        "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                  "client_secret_post"],
        "response_types_supported": ["code"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
    })


@router.get("/oidc/jwks.json")
async def jwks(request: Request) -> Response:
    """The access tokens' verification keys, a JWK Set (RFC 7517 §5)."""
    identity: Identity = request.app.state.fm.identity
    return json_response(identity.signer.jwks())


async def _form(request: Request) -> dict[str, str]:
    """The form body as a dict. Raises: OAuthError ``invalid_request``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != _FORM:
        raise OAuthError("invalid_request", f"The token request must be {_FORM} "
                         "(RFC 6749 §4.4.2).")
    if request.url.query:
        raise OAuthError("invalid_request", "Send the token request's parameters in the "
                         "body, not in the URL.")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > _MAX_BODY:
            raise OAuthError("invalid_request", "The token request body is too large.")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "Malformed form body.") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise OAuthError("invalid_request", f"Parameter '{key}' appears more than once "
                             "(RFC 6749 §3.2).")
        form[key] = value
    return form


def _basic(header: str) -> tuple[str, str]:
    """``(client_id, client_secret)`` from ``Basic …`` (RFC 6749 §2.3.1: both parts are
    form-urlencoded before base64). Raises: OAuthError ``invalid_client``."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError("invalid_client", "Authenticate the client with HTTP Basic "
                         "(client_id:client_secret) or the client_id/client_secret form "
                         "fields.")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "Malformed HTTP Basic credentials.") from None
    cid, sep, secret = decoded.partition(":")
    if not sep or not cid or not secret:
        raise OAuthError("invalid_client", "HTTP Basic credentials must be "
                         "client_id:client_secret.")
    return unquote_plus(cid), unquote_plus(secret)


def _credentials(request: Request, form: dict[str, str]) -> tuple[str, str]:
    """The client's ``(client_id, client_secret)`` by one method or the other."""
    header = request.headers.get("authorization")
    if header:
        if "client_secret" in form:
            raise OAuthError("invalid_request", "Use one client authentication method: "
                             "HTTP Basic or the client_secret form field, not both.")
        cid, secret = _basic(header)
        if form.get("client_id", cid) != cid:
            raise OAuthError("invalid_request", "The client_id form field differs from the "
                             "HTTP Basic client_id.")
        return cid, secret
    cid, secret = form.get("client_id", ""), form.get("client_secret", "")
    if not cid or not secret:
        raise OAuthError("invalid_client", "Missing client credentials: send HTTP Basic "
                         "client_id:client_secret (or client_id and client_secret fields).")
    return cid, secret


def _scopes(form: dict[str, str]) -> list[str]:
    """The requested scopes, in order, without repeats. Raises: invalid_scope."""
    asked: list[str] = []
    for s in (form.get("scope") or API_SCOPE).split(" "):
        if s and s not in asked:
            asked.append(s)
    unknown = [s for s in asked if s not in SCOPES]
    if unknown:
        raise OAuthError("invalid_scope", f"Unsupported scope '{unknown[0][:64]}'; fmserve "
                         f"grants {API_SCOPE} (with {', '.join(NO_OP_SCOPES)} allowed as "
                         "no-ops).")
    if API_SCOPE not in asked:
        raise OAuthError("invalid_scope", f"Request the '{API_SCOPE}' scope (or no scope).")
    return asked


@router.post("/oidc/v1/token")
async def token(request: Request) -> Response:
    """Client-credentials token request (governance §4.2; RFC 6749 §4.4). See the
    module doc for the shapes and every error."""
    form = await _form(request)
    cid, secret = _credentials(request, form)
    grant = form.get("grant_type")
    if not grant:
        raise OAuthError("invalid_request", "Missing grant_type.")
    if grant != GRANT:
        raise OAuthError("unsupported_grant_type", f"Unsupported grant_type "
                         f"'{grant[:80]}'; fmserve supports '{GRANT}'.")
    for name in _UNSUPPORTED_PARAMS:
        if form.get(name):
            raise OAuthError("invalid_request", f"fmserve does not support '{name}' on the "
                             "token request.")
    scopes = _scopes(form)

    identity: Identity = request.app.state.fm.identity
    rec = identity.directory.find(SERVICE_PRINCIPAL, cid)
    sp = identity.directory.principal(rec.id) if rec is not None else None
    # Hash and look up the secret even for an unknown client: the answer takes as long.
    info = await identity.read(identity.credentials.verify_secret,
                               sp.id if sp is not None else "", secret)
    if sp is None or info is None or sp.kind != SERVICE_PRINCIPAL:
        raise OAuthError("invalid_client", _BAD_CLIENT)
    if info.scopes and any(s not in info.scopes for s in scopes):
        raise OAuthError("invalid_scope", "The requested scope exceeds the client secret's "
                         f"scopes ({' '.join(info.scopes)}).")
    if not identity.directory.secret_live(info.id, sp.id):
        await identity.refresh()  # a secret made through another replica moments ago

    lifetime = min(ACCESS_TOKEN_LIFETIME_S, max(1, (info.expire_time - now_ms()) // 1000))
    scope = " ".join(scopes)
    access = identity.signer.mint(issuer=f"{_base(request)}/oidc", application_id=sp.name,
                                  principal_id=sp.id, secret_id=info.id, scope=scope,
                                  lifetime_s=lifetime)
    body: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                            "expires_in": lifetime, "scope": scope}
    response = json_response(body)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response
